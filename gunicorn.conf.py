# Read by `gunicorn wsgi:app` from this directory: starts one sweep per worker after the fork,
# and takes the address and the trusted proxies from hitl-pruner's settings (HITL_*, or
# HITL_CONFIG's TOML file), resolved as wsgi:app resolves them.
from hitl_pruner.gunicorn_hooks import gunicorn_settings
from hitl_pruner.gunicorn_hooks import post_worker_init  # noqa: F401
from hitl_pruner.gunicorn_hooks import pre_fork  # noqa: F401
from hitl_pruner.gunicorn_hooks import worker_exit  # noqa: F401

_hitl = gunicorn_settings()
# X-Forwarded-Proto and a SCRIPT_NAME header count only from HITL_FORWARDED_ALLOW_IPS, as
# hitl-pruner's own forwarded headers do.
forwarded_allow_ips = _hitl["forwarded_allow_ips"]
# HITL_HOST:HITL_PORT (default 127.0.0.1:8080); -b/--bind on the command line wins.
bind = _hitl["bind"]
# gunicorn's default sync worker serves one connection at a time and waits on an idle one (a
# browser opens connections ahead of use): threads keep the page answering, as under `serve`.
# -k / --threads on the command line win.
worker_class = "gthread"
threads = 4
