# A production gunicorn config for hitl-pruner behind a reverse proxy (scripts/nginx/):
#   gunicorn -c scripts/gunicorn.conf.py wsgi:app     (from the repository root, or with
#   --chdir; scripts/systemd/hitl-pruner.service runs exactly that)
# hitl-pruner itself is configured by HITL_* variables (or HITL_CONFIG=file.toml), read by
# wsgi:app. This file adds the server side; tests/test_proxy.py runs gunicorn with it.
import os

# One sweep per worker, started after the fork; the same hooks as ./gunicorn.conf.py.
from hitl_pruner.gunicorn_hooks import post_worker_init  # noqa: F401
from hitl_pruner.gunicorn_hooks import worker_exit  # noqa: F401

# Loopback only: the proxy is the way in.
bind = f"{os.environ.get('HITL_HOST', '127.0.0.1')}:{os.environ.get('HITL_PORT', '8080')}"

# The dashboard polls every few seconds per open page: threads serve those cheaply. Each
# worker runs its own sweep; the sweeps share a lock in the database.
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "gthread"
threads = 4
timeout = 60
graceful_timeout = 15

# The proxies whose forwarded headers count, for gunicorn (X-Forwarded-Proto: https, a
# SCRIPT_NAME header) and hitl-pruner (X-Forwarded-Prefix, -Host, the user header) alike.
forwarded_allow_ips = os.environ.get("HITL_FORWARDED_ALLOW_IPS", "127.0.0.1")

# The peer (the proxy) and, after it, the client address chain the proxy reported.
accesslog = "-"
access_log_format = '%(h)s [%({x-forwarded-for}i)s] %(u)s %(t)s "%(r)s" %(s)s %(b)s %(L)ss'
