"""``GET /healthz`` for proxies and orchestrators: is the database reachable, is the sweep alive.

200 with ``{"status": "ok", "database": "ok", "sweep": {...}}`` when both are; 503 with
``"status": "unavailable"`` when the database does not answer or this process's sweep thread
has died. ``sweep`` says, for the process that answered: ``alive`` (its thread runs),
``active`` (it holds the sweep lock, so it is the one sweeping), ``seconds_since_last_run``
(null if this process has not swept yet) and ``failures`` (failed rounds in a row).

It names no URL, host, setting or error text: a probe may be answered to anyone. What it
sees goes into the process's :class:`~hitl_pruner.outage.DatabaseState`, when given, so that a
probe may be the first to notice an outage, or its end (each logged once).
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING
from typing import Any
from typing import Callable
from typing import Iterable

from . import outage
from .sweep import Sweeper

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse
    from _typeshed.wsgi import WSGIEnvironment

logger = logging.getLogger(__name__)

HEALTH_PATH = "/healthz"


class Health:
    def __init__(
        self,
        ping: Callable[[], object],
        sweeper: Sweeper | None,
        *,
        state: outage.DatabaseState | None = None,
    ) -> None:
        self.ping = ping
        self.sweeper = sweeper
        self.state = state

    def report(self) -> tuple[bool, dict[str, Any]]:
        try:
            # A connection that died in the pool (after a restart) is not an outage.
            outage.retry_stale(self.ping)
            database = "ok"
            if self.state is not None:
                self.state.answered()
        except Exception as exc:
            if self.state is not None and outage.unavailable(exc):
                self.state.failed(exc)
            # The details go to our log only.
            logger.debug("health check: the database did not answer (%s: %s)",
                           type(exc).__name__, str(exc).strip().splitlines()[0] if str(exc) else "")
            database = "unreachable"
        sweeper = self.sweeper
        last_run = sweeper.last_run if sweeper is not None else None
        sweep = {
            "alive": sweeper is not None and sweeper.alive,
            "active": sweeper is not None and sweeper.active,
            "seconds_since_last_run": (
                None if last_run is None else round(max(time.time() - last_run, 0.0), 3)
            ),
            "failures": sweeper.failures if sweeper is not None else 0,
        }
        ok = database == "ok" and bool(sweep["alive"])
        return ok, {"status": "ok" if ok else "unavailable", "database": database, "sweep": sweep}

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        ok, payload = self.report()
        data = json.dumps(payload).encode()
        start_response(
            "200 OK" if ok else "503 Service Unavailable",
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(data))),
                ("Cache-Control", "no-store"),
            ],
        )
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else [data]
