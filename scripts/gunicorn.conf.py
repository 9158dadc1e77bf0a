# A production gunicorn config for hitl-pruner behind a reverse proxy (scripts/nginx/):
#   gunicorn -c scripts/gunicorn.conf.py wsgi:app     (from the repository root, or with
#   --chdir; scripts/systemd/hitl-pruner.service runs exactly that)
# hitl-pruner itself is configured by HITL_* variables (or HITL_CONFIG=file.toml), read by
# wsgi:app. This file adds the server side; tests/test_proxy.py runs gunicorn with it.
import os

# One sweep per worker, started after the fork; the same hooks as ./gunicorn.conf.py.
from hitl_pruner.gunicorn_hooks import gunicorn_settings
from hitl_pruner.gunicorn_hooks import post_worker_init  # noqa: F401
from hitl_pruner.gunicorn_hooks import pre_fork  # noqa: F401
from hitl_pruner.gunicorn_hooks import worker_exit  # noqa: F401

# The address and the trusted proxies, from hitl-pruner's settings as wsgi:app reads them.
_hitl = gunicorn_settings()

# Loopback only (HITL_HOST:HITL_PORT, default 127.0.0.1:8080): the proxy is the way in. A few
# clients that send half a request can hold all of gunicorn's threads; nginx reads every
# request whole before it passes it on (scripts/nginx/, tests/test_slow_clients.py).
bind = _hitl["bind"]

# The dashboard polls every few seconds per open page: threads serve those cheaply. Each
# worker runs its own sweep; the sweeps share a lock in the database.
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "gthread"
threads = 4
timeout = 60
graceful_timeout = 15
# nginx keeps idle upstream connections open for 60 s (keepalive_timeout in the upstream block):
# gunicorn must not close one first, or a POST sent on it as it closes gets nginx's 502 (nginx
# retries no POST).
keepalive = 75

# The proxies whose forwarded headers count (HITL_FORWARDED_ALLOW_IPS), for gunicorn
# (X-Forwarded-Proto: https, a SCRIPT_NAME header) and hitl-pruner (X-Forwarded-Prefix, -Host,
# the user header) alike.
forwarded_allow_ips = _hitl["forwarded_allow_ips"]

# The peer (the proxy) and, after it, the client address chain the proxy reported.
accesslog = "-"
access_log_format = '%(h)s [%({x-forwarded-for}i)s] %(u)s %(t)s "%(r)s" %(s)s %(b)s %(L)ss'
