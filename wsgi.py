"""`gunicorn wsgi:app`: hitl-pruner configured from HITL_* environment variables."""

from hitl_pruner.from_env import app  # noqa: F401
