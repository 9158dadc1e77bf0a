"""One sweep at a time across every process and server on a database, by the database's own lock.

Every serving process runs a sweep thread, but only the holder of the sweep lock runs the
sweep; the others try to take the lock once per interval, so when the holder dies another
process sweeps within one interval.

- PostgreSQL: a session-level advisory lock (``pg_try_advisory_lock``) on a connection of its
  own, kept open while sweeping. Advisory locks are scoped to the database, so the key is fixed.
- MySQL/MariaDB: ``GET_LOCK`` on a connection of its own. Its names are server-wide, so the name
  carries the database's name.
- SQLite and journal files: ``flock`` on ``<file>.hitl-sweep.lock`` next to the database file
  (one machine; the kernel releases it when the process dies).

A database lock dies with its connection: the server releases the lock of a killed process as
soon as its socket closes. So the holder checks its connection every sweep (``check()``) and, if
it was lost, gives up the turn and tries to take the lock again.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from pathlib import Path
import threading
from typing import IO
from typing import Protocol

import sqlalchemy as sa

logger = logging.getLogger(__name__)

LOCK_NAME = "hitl_pruner.sweep"
# pg_try_advisory_lock takes a bigint: a fixed one derived from the name (hashtext() is an
# internal function whose results may change between PostgreSQL versions). Positive, so that
# pg_locks' two unsigned halves (classid, objid) put it back together without a sign.
PG_KEY = int.from_bytes(hashlib.sha256(LOCK_NAME.encode()).digest()[:8], "big") >> 2
# MySQL 5.7+ refuses GET_LOCK names over 64 characters.
MYSQL_NAME_MAX = 64
FILE_SUFFIX = ".hitl-sweep.lock"


class SweepLock(Protocol):
    @property
    def held(self) -> bool: ...

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it; True if this object holds it now. Never waits."""
        ...

    def check(self) -> bool:
        """Whether the lock is still held (a database lock is lost with its connection)."""
        ...

    def release(self) -> None: ...


class _DbLock:
    """A session-level database lock on a connection taken out of the pool for it.

    The connection stays open while waiting too, so a waiting process asks again with one
    query per interval rather than a new connection.
    """

    def __init__(self, engine: sa.Engine) -> None:
        self._engine = engine
        self._conn: sa.Connection | None = None
        self._held = False

    @property
    def held(self) -> bool:
        return self._held

    @property
    def connection(self) -> sa.Connection | None:
        """The connection that holds the lock, while held: the sweep's watch (wake.py) listens
        or polls on it, so that losing it is noticed there too."""
        return self._conn if self._held else None

    def _acquire_sql(self, conn: sa.Connection) -> bool:
        raise NotImplementedError

    def _check_sql(self, conn: sa.Connection) -> bool:
        raise NotImplementedError

    def _release_sql(self, conn: sa.Connection) -> None:
        raise NotImplementedError

    def try_acquire(self) -> bool:
        if self._held:
            return True
        if self._conn is not None:
            try:
                self._held = self._acquire_sql(self._conn)
                return self._held
            except Exception:
                # The connection kept while waiting died (a database restart): ask again now
                # on a new one, so that a waiting process takes over within the interval.
                self._close()
        conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        # Out of the pool: closing it closes the connection, which is what releases a lock
        # whose release statement could not be sent. A pooled one would keep the lock.
        conn.detach()
        self._conn = conn
        try:
            self._held = self._acquire_sql(self._conn)
        except BaseException:
            self._close()
            raise
        return self._held

    def check(self) -> bool:
        if not self._held or self._conn is None:
            return False
        try:
            if self._check_sql(self._conn):
                return True
            logger.warning("the sweep lock is no longer held by this process")
        except Exception as exc:
            logger.warning("lost the sweep lock's connection (%s)", type(exc).__name__)
        self._close()
        return False

    def release(self) -> None:
        if self._conn is None:
            return
        if self._held:
            try:
                self._release_sql(self._conn)
            except Exception:
                pass  # closing the connection below releases it anyway
        self._close()

    def _close(self) -> None:
        conn, self._conn, self._held = self._conn, None, False
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass


class PostgresLock(_DbLock):
    def _acquire_sql(self, conn: sa.Connection) -> bool:
        return bool(conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": PG_KEY})
                    .scalar())

    def _check_sql(self, conn: sa.Connection) -> bool:
        sql = (
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND pid = pg_backend_pid() AND objsubid = 1 "
            "AND ((classid::bigint << 32) | objid::bigint) = :k"
        )
        return bool(conn.execute(sa.text(sql), {"k": PG_KEY}).scalar())

    def _release_sql(self, conn: sa.Connection) -> None:
        conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": PG_KEY})


class MysqlLock(_DbLock):
    def __init__(self, engine: sa.Engine) -> None:
        super().__init__(engine)
        self._name: str | None = None

    def _lock_name(self, conn: sa.Connection) -> str:
        if self._name is None:
            database = conn.execute(sa.text("SELECT DATABASE()")).scalar() or ""
            name = f"{LOCK_NAME}.{database}"
            if len(name) > MYSQL_NAME_MAX:
                name = f"{LOCK_NAME}.{hashlib.sha256(database.encode()).hexdigest()[:40]}"
            self._name = name
        return self._name

    def _acquire_sql(self, conn: sa.Connection) -> bool:
        name = self._lock_name(conn)
        # 1: taken; 0: another session holds it; NULL: an error.
        return conn.execute(sa.text("SELECT GET_LOCK(:n, 0)"), {"n": name}).scalar() == 1

    def _check_sql(self, conn: sa.Connection) -> bool:
        return bool(conn.execute(sa.text("SELECT IS_USED_LOCK(:n) = CONNECTION_ID()"),
                                 {"n": self._lock_name(conn)}).scalar())

    def _release_sql(self, conn: sa.Connection) -> None:
        conn.execute(sa.text("SELECT RELEASE_LOCK(:n)"), {"n": self._lock_name(conn)})


class FileLock:
    """``flock`` on a file next to the database; the kernel releases it when the process dies."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._file: IO[bytes] | None = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def try_acquire(self) -> bool:
        if self._file is not None:
            return True
        file = open(self.path, "ab")
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.close()
            return False
        except BaseException:
            file.close()
            raise
        self._file = file
        return True

    def check(self) -> bool:
        return self._file is not None

    def release(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            file.close()  # closing the only descriptor of this open file releases the flock


class LocalLock:
    """For a database only this process can see (in-memory SQLite): always ours."""

    def __init__(self) -> None:
        self._held = False
        self._guard = threading.Lock()

    @property
    def held(self) -> bool:
        return self._held

    def try_acquire(self) -> bool:
        with self._guard:
            self._held = True
            return True

    def check(self) -> bool:
        return self._held

    def release(self) -> None:
        self._held = False


def for_engine(engine: sa.Engine) -> SweepLock:
    """The sweep lock of an RDB storage's database."""
    dialect = engine.dialect.name
    if dialect == "postgresql":
        return PostgresLock(engine)
    if dialect in ("mysql", "mariadb"):
        return MysqlLock(engine)
    if dialect == "sqlite":
        database = engine.url.database
        if not database or database == ":memory:" or database.startswith("file:"):
            return LocalLock()
        return FileLock(database + FILE_SUFFIX)
    raise ValueError(f"no sweep lock for the database dialect {dialect!r}")


def for_journal(path: str | os.PathLike[str]) -> SweepLock:
    """The sweep lock of a journal file."""
    return FileLock(os.fspath(path) + FILE_SUFFIX)
