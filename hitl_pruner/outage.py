"""Database outages: tell them from bugs, say once when one starts and ends, answer JSON 503.

A database that does not answer is a normal fault: a request that needs it gets a JSON ``503``
with a reason and ``Retry-After`` (the sweep's interval), the log gets one line when the
database goes away and one when it is back (per process, however many requests and sweep
rounds meet the outage), and the sweep retries every interval. Any other error stays a bug:
logged with its traceback and answered with a JSON ``500``.

- :func:`unavailable` says whether an exception means "the database cannot be reached" (a
  refused or dropped connection, a server shutting down or starting up, too many connections,
  a locked SQLite file) rather than a mistake in a query. It looks through the exception's
  causes: Optuna's storage wraps SQLAlchemy's errors in ``StorageInternalError``.
- :class:`DatabaseState` is this process's view: up, or down since when. Whoever meets the
  outage first (a request, the sweep, ``/healthz``) marks it down; whoever gets an answer
  again marks it up. Each change is logged once.
- :class:`OutageMiddleware` is the WSGI layer. While the database is known to be down, a
  request for a route that needs it (``/api/...``, ``/hitl/api/...``, ``/csv/...``,
  ``/artifacts/...``, and the dashboard's page, which checks the schema version on every
  load) first costs one ping: still down, the 503 at once (the dashboard is not
  asked, so it logs nothing); answering, the request goes on. A request that raises a database
  error, or that the dashboard or our UI turned into a 500 while a ping now fails, gets the 503
  too. Static files, the Human actions page and ``/healthz`` (which answers for itself) pass
  untouched.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import sys
import threading
import time
from typing import TYPE_CHECKING
from typing import Any
from typing import Callable
from typing import Iterable
from typing import Iterator

import sqlalchemy as sa

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse
    from _typeshed.wsgi import WSGIApplication
    from _typeshed.wsgi import WSGIEnvironment

logger = logging.getLogger(__name__)

# Where the request's DatabaseState is, for code deeper down that meets an outage.
STATE_KEY = "hitl_pruner.database"
# Routes that read or write the database: the APIs, and the dashboard's page, whose request
# hook reads the schema version first. Static files and our actions page do not.
DATABASE_PATHS = (
    "/api/", "/hitl/api/", "/csv/", "/artifacts/", "/dashboard", "/incompatible-rdb-schema"
)
# PostgreSQL SQLSTATE classes: connection exception, insufficient resources (too many
# connections, disk full), operator intervention (shutdown, starting up, statement timeout),
# system error (I/O).
PG_UNAVAILABLE = ("08", "53", "57", "58")
# MySQL/MariaDB server errors meaning "not now": too many connections, server shutdown,
# connection killed, disconnected for inactivity. 2000-2999 are the client's own (cannot
# connect, server has gone away, lost connection).
MYSQL_UNAVAILABLE = frozenset({1040, 1053, 1077, 1927, 4031})
SQLITE_UNAVAILABLE = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_CANTOPEN", "SQLITE_IOERR")
SQLITE_UNAVAILABLE_TEXT = ("database is locked", "unable to open database file", "disk i/o error")


def unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error it was raised from) means the database cannot be reached."""
    for error in _chain(exc):
        if isinstance(error, sa.exc.TimeoutError):
            return True  # the pool waited for a connection that never came back
        if isinstance(error, sa.exc.DBAPIError):
            if error.connection_invalidated:
                return True
            if isinstance(error, sa.exc.OperationalError):
                return _driver_unavailable(error.orig)
    return False


def stale(exc: BaseException) -> bool:
    """Whether ``exc`` came from a pooled connection that had died (the pool dropped it)."""
    return any(
        isinstance(error, sa.exc.DBAPIError) and error.connection_invalidated
        for error in _chain(exc)
    )


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _driver_unavailable(orig: BaseException | None) -> bool:
    """For an OperationalError: the driver's code, where the driver gives one."""
    if isinstance(orig, sqlite3.Error):
        name = getattr(orig, "sqlite_errorname", "")  # Python >= 3.11
        return name.startswith(SQLITE_UNAVAILABLE) or any(
            text in str(orig).lower() for text in SQLITE_UNAVAILABLE_TEXT
        )
    module = type(orig).__module__ or ""
    if module.startswith("psycopg2"):
        code = getattr(orig, "pgcode", None)
        # No code: the client's own error (refused, or the server closed the connection).
        return code is None or code.startswith(PG_UNAVAILABLE)
    if module.startswith("pymysql"):
        errno = orig.args[0] if orig is not None and orig.args else None
        if not isinstance(errno, int):
            return True
        return 2000 <= errno < 3000 or errno in MYSQL_UNAVAILABLE
    # Other drivers: the DB-API's OperationalError is "not under the programmer's control".
    return True


def describe(exc: BaseException) -> str:
    """The type and first line of the driver's message, for one log line."""
    error = next((e for e in _chain(exc) if isinstance(e, sa.exc.DBAPIError)), exc)
    cause = error.orig if isinstance(error, sa.exc.DBAPIError) and error.orig else error
    text = str(cause).strip()
    return f"{type(cause).__name__}: {text.splitlines()[0]}" if text else type(cause).__name__


class DatabaseState:
    """Whether this process can reach its database, as last seen; logs each change once."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._down_since: float | None = None
        # A plain attribute, read by every request: True from failed() to answered().
        self.down = False

    def failed(self, exc: BaseException) -> None:
        """The database did not answer (``exc`` is an :func:`unavailable` error)."""
        with self._guard:
            if self._down_since is not None:
                return
            self._down_since = time.monotonic()
            self.down = True
        logger.warning(
            "database unavailable (%s); requests that need it get 503 until it is back",
            describe(exc),
        )

    def answered(self) -> None:
        """The database answered."""
        with self._guard:
            since, self._down_since = self._down_since, None
            self.down = False
        if since is not None:
            logger.info("database back after %.1f s", time.monotonic() - since)


def report(environ: WSGIEnvironment, exc: BaseException) -> None:
    """For code under :class:`OutageMiddleware` that handles an outage error itself."""
    state = environ.get(STATE_KEY)
    if isinstance(state, DatabaseState):
        state.failed(exc)
    else:
        logger.warning("database unavailable (%s)", describe(exc))


def retry_stale(call: Callable[[], object]) -> None:
    """``call()``, once more at once if it met a connection that died in the pool.

    Without pre-ping, the first use of a pooled connection after a database restart fails and
    makes the pool drop its connections; the next attempt gets a fresh one. Only for reads.
    """
    try:
        call()
    except Exception as exc:
        if not stale(exc):
            raise
        call()


class OutageMiddleware:
    """Answer requests that meet a database outage with a JSON 503 and ``Retry-After``."""

    def __init__(
        self,
        application: WSGIApplication,
        *,
        state: DatabaseState,
        ping: Callable[[], object],
        retry_after: float,
    ) -> None:
        self.application = application
        self.state = state
        self.ping = ping
        # Whole seconds (RFC 9110); the sweep looks again every interval.
        self.retry_after = max(1, math.ceil(retry_after))

    def __getattr__(self, name: str) -> Any:
        if name == "application":  # not set yet: no wrapped app to ask
            raise AttributeError(name)
        return getattr(self.application, name)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        environ[STATE_KEY] = self.state
        path = environ.get("PATH_INFO", "")
        if not (path.startswith(DATABASE_PATHS) or path in ("", "/")):
            return self.application(environ, start_response)
        if self.state.down and not self._answers():
            return self._unavailable(environ, start_response)
        response = _Deferred(start_response)
        try:
            result = self.application(environ, response)
        except Exception as exc:
            exc_info = sys.exc_info() if response.started else None
            if unavailable(exc):
                self.state.failed(exc)
                return self._unavailable(environ, start_response, exc_info)
            logger.exception(
                "%s %s failed", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO")
            )
            return _json(start_response, "500 Internal Server Error",
                         {"reason": "internal server error"}, exc_info=exc_info)
        if response.held is None:
            return result
        # A 500 from the dashboard or our UI, which catch their errors themselves: if the
        # database does not answer now, that was the cause.
        if not self._answers():
            close = getattr(result, "close", None)
            if close is not None:
                close()
            return self._unavailable(environ, start_response)
        response.release()
        return result

    def _answers(self) -> bool:
        """Ping the database; record what it says."""
        try:
            retry_stale(self.ping)
        except Exception as exc:
            if not unavailable(exc):
                return True  # not an outage: let the request meet it and be logged
            self.state.failed(exc)
            return False
        self.state.answered()
        return True

    def _unavailable(
        self, environ: WSGIEnvironment, start_response: StartResponse, exc_info: Any = None
    ) -> list[bytes]:
        reason = f"the database is unavailable; try again in {self.retry_after} s"
        body = _json(start_response, "503 Service Unavailable", {"reason": reason},
                     [("Retry-After", str(self.retry_after))], exc_info=exc_info)
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else body


class _Deferred:
    """A start_response that holds back a 500 until we know whether it was an outage."""

    # Class defaults: one of these is built per request, so __init__ sets one attribute.
    started = False
    held: tuple[str, list[tuple[str, str]], Any] | None = None
    _write: Callable[[bytes], object] | None = None

    def __init__(self, start_response: StartResponse) -> None:
        self._start_response = start_response

    def __call__(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], object]:
        self.started = True
        if status.startswith("500"):
            self.held = (status, headers, exc_info)
            return self._write_held
        self.held = None
        return self._start_response(status, headers, exc_info)

    def release(self) -> None:
        held, self.held = self.held, None
        if held is not None:
            self._write = self._start_response(*held)

    def _write_held(self, data: bytes) -> None:
        # The legacy write() callable: the held status goes out before any body.
        self.release()
        assert self._write is not None
        self._write(data)


def _json(
    start_response: StartResponse,
    status: str,
    payload: dict[str, Any],
    extra: list[tuple[str, str]] | None = None,
    *,
    exc_info: Any = None,
) -> list[bytes]:
    data = json.dumps(payload).encode()
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(data))),
        ("Cache-Control", "no-store"),
        *(extra or []),
    ]
    start_response(status, headers, exc_info)
    return [data]
