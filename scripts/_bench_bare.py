"""The bare optuna-dashboard as a gunicorn app, for scripts/bench_latency.py's A/B runs:
``gunicorn --pythonpath scripts _bench_bare:app`` with HITL_STORAGE_URL set, from the
repository root, so that it runs under the same gunicorn.conf.py settings as ``wsgi:app``."""

import os

import optuna_dashboard

app = optuna_dashboard.wsgi(os.environ["HITL_STORAGE_URL"])
