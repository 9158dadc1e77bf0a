"""gunicorn hooks: one sweep per worker process, started after the fork.

Threads do not survive fork(), so under ``--preload`` a sweep started at import would run in
the master only. ``gunicorn.conf.py`` (read by plain ``gunicorn wsgi:app``) and ``serve`` use
these hooks; the middleware also starts the sweep on a process's first request as a fallback.
An exception in a hook halts gunicorn, so these only log.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def post_worker_init(worker: Any) -> None:
    try:
        start = getattr(worker.wsgi, "start_background", None)
        if start is not None:
            start()
    except Exception:
        logger.exception("could not start the sweep in worker %s", worker.pid)


def worker_exit(server: Any, worker: Any) -> None:
    try:
        stop = getattr(getattr(worker, "wsgi", None), "stop_background", None)
        if stop is not None:
            stop()
    except Exception:
        logger.exception("could not stop the sweep in worker %s", worker.pid)
