# Read by `gunicorn wsgi:app` from this directory: starts one sweep per worker after the fork.
import os

from hitl_pruner.gunicorn_hooks import post_worker_init  # noqa: F401
from hitl_pruner.gunicorn_hooks import worker_exit  # noqa: F401

# HITL_HOST / HITL_PORT choose the address unless -b/--bind is given on the command line.
if os.environ.get("HITL_HOST") or os.environ.get("HITL_PORT"):
    bind = f"{os.environ.get('HITL_HOST', '127.0.0.1')}:{os.environ.get('HITL_PORT', '8080')}"
