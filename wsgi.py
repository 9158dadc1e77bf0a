"""`gunicorn wsgi:app`: hitl-pruner configured from HITL_* environment variables."""

from hitl_pruner.wsgi import app  # noqa: F401
