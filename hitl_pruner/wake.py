"""How the sweeping process learns, between its rounds, that a note was written.

The trigger queues every note write in ``hitl_note_changes`` (rdb.py), whoever writes it. A
watch tells the sweep when to read that queue, so that a note written by a script is applied
within a fraction of a second instead of at the next ``--interval``. Only the process holding
the sweep lock watches (sweep.py), and a watch costs next to nothing while nothing is written:

- PostgreSQL: the trigger also calls ``pg_notify('hitl_note_changed', <study id>)``; the
  watch ``LISTEN``s on the connection that holds the sweep lock and waits on its socket.
- MySQL/MariaDB: every ``every`` seconds, the queue's newest id, on the lock's connection: one
  lookup at the end of the primary key of a table that is usually empty.
- SQLite: every ``every`` seconds, ``PRAGMA data_version`` on a connection of its own, which
  changes only when another connection committed; only then the count of note writes a trigger
  keeps in ``hitl_meta``. The sweep's own writes (on other connections) cost that one lookup,
  and wake nothing.

A watch may wake the sweep for nothing (a write of a study the sweep does not watch); it must
not sleep through a new note. Journal storages have no queue, so no watch: their sweep keeps
the interval.
"""

from __future__ import annotations

import select
import time
from typing import Any
from typing import Callable
from typing import Protocol

import sqlalchemy as sa

from .lock import MysqlLock
from .lock import PostgresLock
from .lock import SweepLock
from .rdb import NOTE_WRITES
from .rdb import NOTIFY_CHANNEL

# How often the MySQL and SQLite watches look. Each look wakes a sleeping thread, which costs
# about 0.2 ms of CPU whatever it then does (measured on SQLite: 70 us for the wake, 120 us
# for a query on cold caches), taken from the requests a busy server is answering; a look
# every 0.25 s still applies a note within the half second (with sweep.WAKE_SETTLE).
POLL_EVERY = 0.25
NEWEST = "SELECT max(id) FROM hitl_note_changes"
WRITES = f"SELECT value FROM hitl_meta WHERE name = '{NOTE_WRITES}'"


def _scalar(conn: sa.Connection, sql: str) -> object:
    """One value, on the driver's own cursor: a poll four times a second costs a tenth of what
    it costs through SQLAlchemy's execution machinery. The connection is in autocommit."""
    raw: Any = conn.connection.dbapi_connection
    cursor = raw.cursor()
    try:
        cursor.execute(sql)
        row = cursor.fetchone()
    finally:
        cursor.close()
    return row[0] if row else None


class Watch(Protocol):
    def wait(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds (less is fine); True when a note may have been
        written since the previous call. A database error is a True: the caller's next step
        (the lock's ``check()``, the queue read) meets it and handles it."""
        ...

    def close(self) -> None: ...


class PgListen:
    """``LISTEN`` on the sweep lock's connection; the note trigger ``NOTIFY``s."""

    def __init__(self, lock: PostgresLock) -> None:
        self._lock = lock
        self._listening: Any = None  # the DB-API connection we LISTEN on

    def wait(self, timeout: float) -> bool:
        conn = self._lock.connection
        if conn is None:
            time.sleep(timeout)
            return False
        raw: Any = conn.connection.dbapi_connection
        try:
            if raw is not self._listening:
                # The lock's connection is in autocommit: LISTEN holds from here on. A note
                # written before it notified nobody, so the queue is read once now.
                with raw.cursor() as cursor:
                    cursor.execute(f"LISTEN {NOTIFY_CHANNEL}")
                self._listening = raw
                return True
            if not raw.notifies:
                ready, _, _ = select.select([raw], [], [], timeout)
                if not ready:
                    return False
                raw.poll()
        except Exception:
            return True
        if raw.notifies:
            # Any number of writes, one queue read: it takes every row there is.
            del raw.notifies[:]
            return True
        return False

    def close(self) -> None:
        self._listening = None  # the lock's connection, and its LISTEN, end with the lock


class _Newest:
    """Whether the queue's newest row is one we have not seen."""

    def __init__(self) -> None:
        self._seen: object = None

    def changed(self, conn: sa.Connection) -> bool:
        newest = _scalar(conn, NEWEST)
        changed = newest is not None and newest != self._seen
        self._seen = newest
        return changed


class QueuePoll:
    """The queue's newest id every ``every`` seconds, on the sweep lock's connection."""

    def __init__(self, connection: Callable[[], sa.Connection | None], *,
                 every: float = POLL_EVERY) -> None:
        self._connection = connection
        self.every = every
        self._newest = _Newest()

    def wait(self, timeout: float) -> bool:
        time.sleep(min(timeout, self.every))
        conn = self._connection()
        if conn is None:
            return False
        try:
            return self._newest.changed(conn)
        except Exception:
            return True

    def close(self) -> None:
        self._newest = _Newest()


class DataVersion:
    """SQLite: ``PRAGMA data_version`` every ``every`` seconds; when it moved, the count of note
    writes that a trigger keeps (rdb.py: SQLite reuses a deleted row's id, so the queue's newest
    id would miss the text of a note whose version row was just handled)."""

    def __init__(self, engine: sa.Engine, *, every: float = POLL_EVERY) -> None:
        self._engine = engine
        self.every = every
        self._conn: sa.Connection | None = None
        self._version: object = None
        self._writes: object = None

    def wait(self, timeout: float) -> bool:
        time.sleep(min(timeout, self.every))
        try:
            if self._conn is None:
                # Its own connection, kept: data_version counts the commits of the others.
                conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
                conn.detach()
                self._conn = conn
            version = _scalar(self._conn, "PRAGMA data_version")
            if version == self._version:
                return False
            self._version = version
            writes = _scalar(self._conn, WRITES)
            changed, self._writes = writes != self._writes, writes
            return changed
        except Exception:
            self.close()
            return True

    def close(self) -> None:
        conn, self._conn, self._version, self._writes = self._conn, None, None, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass


def for_engine(engine: sa.Engine, lock: SweepLock | None) -> Watch | None:
    """The watch for an RDB storage's sweep that holds ``lock``; None where there is none."""
    dialect = engine.dialect.name
    if dialect == "postgresql" and isinstance(lock, PostgresLock):
        return PgListen(lock)
    if dialect in ("mysql", "mariadb") and isinstance(lock, MysqlLock):
        return QueuePoll(lambda: lock.connection)
    database = engine.url.database
    if dialect == "sqlite" and database and database != ":memory:" and not database.startswith(
        "file:"
    ):
        return DataVersion(engine)
    return None
