"""The store for Optuna's RDB storages (SQLite, PostgreSQL, MySQL/MariaDB).

Optuna's storage API refuses to touch a finished trial, so state changes are written to the
``trials`` table directly, as a compare-and-set on the state we read, in the same transaction
as the audit row: two servers acting at once change a trial once, and every change has its
record.

Notes are found through a change queue: a trigger on ``study_system_attributes`` adds a row to
``hitl_note_changes`` for every write of a note key, whoever writes it (the dashboard, a script
calling ``optuna_dashboard.save_note``, another server). The sweep reads the queue, applies the
current notes, and deletes the rows it handled, so its cost follows what changed, not the size
of the study, and a row that commits late is still seen by the next sweep.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
from typing import Iterable
from typing import Sequence

from optuna.storages import RDBStorage
from optuna.storages._rdb import models
from optuna.trial import TrialState
import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles

from .audit import FORCED
from .audit import STUDY_ROW
from .audit import SWEEP
from .audit import AuditEntry
from .notes import note_str_key_prefix
from .notes import note_ver_key
from .notes import split_body
from .requests import COOPERATIVE_ATTR
from .requests import DEFAULT_ALIVE_FOR
from .requests import REQUEST_ATTR
from .requests import WORKER_ATTR_PREFIX
from .requests import Request
from .requests import evidence
from .requests import request_value
from .store import NOTE_KEY
from .store import AuditFilter
from .store import Change
from .store import LostRace
from .store import Note
from .store import TrialRef
from .transitions import ACTIVE
from .transitions import LastChange
from .transitions import Worker

logger = logging.getLogger(__name__)

trials_t: sa.Table = models.TrialModel.__table__  # type: ignore[assignment]
studies_t: sa.Table = models.StudyModel.__table__  # type: ignore[assignment]
attrs_t: sa.Table = models.StudySystemAttributeModel.__table__  # type: ignore[assignment]
trial_attrs_t: sa.Table = models.TrialSystemAttributeModel.__table__  # type: ignore[assignment]
steps_t: sa.Table = models.TrialIntermediateValueModel.__table__  # type: ignore[assignment]

metadata = sa.MetaData()
audit_t = sa.Table(
    "hitl_audit",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("study_id", sa.Integer, nullable=False),
    sa.Column("study_name", sa.String(512), nullable=False),
    sa.Column("trial_id", sa.Integer, nullable=False, index=True),
    sa.Column("trial_number", sa.Integer, nullable=False),
    sa.Column("from_state", sa.String(16), nullable=False),
    sa.Column("to_state", sa.String(16), nullable=False),
    sa.Column("note_version", sa.Integer),
    sa.Column("user_name", sa.String(256)),
    sa.Column("source", sa.String(32), nullable=False),
    sa.Column("retroactive", sa.Boolean, nullable=False),
    sa.Column("is_undo", sa.Boolean, nullable=False),
    # "forced", "worker" or "grace": see audit.py.
    sa.Column("how", sa.String(16), nullable=False, default=FORCED),
    # The reason the note gave with its command (Applier.reason_of); added in 0.x, so an older
    # table gets it from install() (_add_columns).
    sa.Column("reason", sa.String(500)),
    # Workers read the newest relabel of their study through this index (worker.py), one
    # lookup per check.
    sa.Index("ix_hitl_audit_relabels", "study_id", "retroactive", "id"),
)
# Open requests to cooperative workers, one per trial; the worker reads its row by primary key.
requests_t = sa.Table(
    "hitl_requests",
    metadata,
    sa.Column("trial_id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("study_id", sa.Integer, nullable=False, index=True),
    sa.Column("study_name", sa.String(512), nullable=False),
    sa.Column("trial_number", sa.Integer, nullable=False),
    sa.Column("target", sa.String(16), nullable=False),
    sa.Column("note_version", sa.Integer),
    sa.Column("user_name", sa.String(256)),
    sa.Column("source", sa.String(32), nullable=False),
    sa.Column("requested_at", sa.DateTime, nullable=False),
    sa.Column("deadline", sa.DateTime, nullable=False),
    # The note's reason when it asked (requests.Request.reason); added in 0.2, see _add_columns.
    sa.Column("reason", sa.String(500)),
)
# Heartbeats of wrapped workers: one row per worker process and study, refreshed while it checks
# (worker.py) and deleted when it exits. The server asks a trial's worker that has not marked
# the trial only while one of these is recent.
workers_t = sa.Table(
    "hitl_workers",
    metadata,
    sa.Column("study_id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("worker", sa.String(64), primary_key=True),
    # Seconds since the epoch on the database's clock (db_clock), the one clock every process
    # shares, whatever its own clock or time zone says.
    sa.Column("seen_at", sa.Double, nullable=False),
)
changes_t = sa.Table(
    "hitl_note_changes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("study_id", sa.Integer, nullable=False, index=True),
    sa.Column("attr_key", sa.String(512), nullable=False),
)
meta_t = sa.Table(
    "hitl_meta",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(256), nullable=False),
)

# The Human actions view lists the audit newest first, filtered, a page at a time below an id
# (SqlStore.audit_page). Each filter has an index that ends in id, so a page is one ordered
# index range however large the audit and however deep the page; combined filters walk the
# index of one of them. Added to an existing hitl_audit by install() (_install_indexes).
AUDIT_LISTING_INDEXES = (
    sa.Index("ix_hitl_audit_study", audit_t.c.study_id, audit_t.c.id),
    sa.Index("ix_hitl_audit_study_trial", audit_t.c.study_id, audit_t.c.trial_number,
             audit_t.c.id),
    sa.Index("ix_hitl_audit_user", audit_t.c.user_name, audit_t.c.id),
    sa.Index("ix_hitl_audit_to_state", audit_t.c.to_state, audit_t.c.id),
    sa.Index("ix_hitl_audit_kind", audit_t.c.retroactive, audit_t.c.is_undo, audit_t.c.id),
)

class db_clock(sa.sql.functions.FunctionElement[float]):
    """The database server's clock, in seconds since the epoch."""

    type = sa.Double()
    inherit_cache = True


@compiles(db_clock, "sqlite")
def _sqlite_clock(element: db_clock, compiler: sa.sql.compiler.SQLCompiler, **kw: object) -> str:
    return "((julianday('now') - 2440587.5) * 86400.0)"


@compiles(db_clock, "postgresql")
def _postgresql_clock(element: db_clock, compiler: sa.sql.compiler.SQLCompiler,
                      **kw: object) -> str:
    return "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"


@compiles(db_clock, "mysql")
@compiles(db_clock, "mariadb")
def _mysql_clock(element: db_clock, compiler: sa.sql.compiler.SQLCompiler, **kw: object) -> str:
    # UNIX_TIMESTAMP reads NOW() in the session's time zone, so the result does not depend on it.
    return "(UNIX_TIMESTAMP(NOW(6)) + 0E0)"


TRIGGER = "hitl_note_changed"
FAIL_TRIGGER = "hitl_fail_on_request"
# The trigger's NOTIFY channel on PostgreSQL (wake.py listens).
NOTIFY_CHANNEL = "hitl_note_changed"
# SQLite: a second trigger counts the note writes in this hitl_meta row (wake.py reads it).
COUNTER_TRIGGER = "hitl_note_counted"
NOTE_WRITES = "note_writes"
# A LIKE pattern for trial note keys; it does not match the study's own note ("dashboard:note_*").
NOTE_LIKE = "dashboard:%:note_%"
# The study's own note ("dashboard:note_ver", "dashboard:note_str:<i>"), for STOP
# (study_stop.py): queued by triggers of their own, so that the trial-note triggers of existing
# databases stay as they are and these are added at the next start. Their queue rows name no
# trial (store.Change.trial_id -1); the sweep hands their studies to study_stop.
STUDY_NOTE_TRIGGER = "hitl_study_note_changed"
STUDY_NOTE_COUNTER = "hitl_study_note_counted"
STUDY_NOTE_LIKE = "dashboard:note_%"
# Most notes fit in one chunk of 2045 characters: the first query asks for two (so that only a
# longer note costs another round trip, for more at a time), and no more, as every key asked
# for is a bound parameter (a sweep of 1,000 notes asks for 3,000 keys).
FIRST_CHUNKS = 2
CHUNKS_PER_QUERY = 8


# hitl_meta: the last queue id of the notes written before the first start (first_start.py).
EXISTING_UPTO = "existing_notes_upto"

# Processes starting together race at each step of install(): create_all and each trigger.
ATTEMPTS = 5


class InstallError(RuntimeError):
    """The database refused what hitl-pruner needs (tables, triggers)."""


# The PostgreSQL trigger functions' bodies. A body changed in a new version replaces the one an
# older version installed (install() compares them), so existing databases are upgraded too.
PG_FUNCTIONS = {
    # Queue the write, and wake the sweeping process, which LISTENs (wake.py). NOTIFY is sent at
    # commit, so the sweep reads a queue row that is there.
    TRIGGER: (
        "BEGIN INSERT INTO hitl_note_changes (study_id, attr_key) VALUES (NEW.study_id, NEW.key); "
        f"PERFORM pg_notify('{NOTIFY_CHANNEL}', NEW.study_id::text); RETURN NULL; END"
    ),
    FAIL_TRIGGER: (
        "BEGIN IF EXISTS (SELECT 1 FROM hitl_requests r WHERE r.trial_id = NEW.trial_id "
        "AND r.target = 'FAIL') THEN NEW.state := 'FAIL'; END IF; RETURN NEW; END"
    ),
}


def _pg_function(name: str) -> str:
    return (
        f"CREATE OR REPLACE FUNCTION {name}() RETURNS trigger AS $$ {PG_FUNCTIONS[name]} $$ "
        "LANGUAGE plpgsql"
    )


def _trigger_ddl(dialect: str) -> list[tuple[str, list[str]]]:
    """(trigger name, statements creating it) per dialect: trial notes, then the study note."""
    return _trial_note_trigger_ddl(dialect) + _study_note_trigger_ddl(dialect)


def _study_note_trigger_ddl(dialect: str) -> list[tuple[str, list[str]]]:
    """The study note's keys into the same queue, waking the sweep as a trial note's do."""
    insert = "INSERT INTO hitl_note_changes (study_id, attr_key) VALUES (NEW.study_id, NEW.{k})"
    events = ("INSERT", "UPDATE")
    if dialect == "sqlite":
        return [
            (f"{STUDY_NOTE_TRIGGER}_{e.lower()}", [
                f"CREATE TRIGGER IF NOT EXISTS {STUDY_NOTE_TRIGGER}_{e.lower()} AFTER {e} ON "
                f"study_system_attributes WHEN NEW.key LIKE '{STUDY_NOTE_LIKE}' "
                f"BEGIN {insert.format(k='key')}; END"
            ]) for e in events
        ] + [
            (f"{STUDY_NOTE_COUNTER}_{e.lower()}", [
                f"CREATE TRIGGER IF NOT EXISTS {STUDY_NOTE_COUNTER}_{e.lower()} AFTER {e} ON "
                f"study_system_attributes WHEN NEW.key LIKE '{STUDY_NOTE_LIKE}' "
                "BEGIN UPDATE hitl_meta SET value = CAST(value AS INTEGER) + 1 "
                f"WHERE name = '{NOTE_WRITES}'; END"
            ]) for e in events
        ]
    if dialect == "postgresql":
        # The trial notes' function: it queues NEW.key and notifies, whatever the key.
        return [(STUDY_NOTE_TRIGGER, [
            f"CREATE TRIGGER {STUDY_NOTE_TRIGGER} AFTER INSERT OR UPDATE ON "
            f"study_system_attributes FOR EACH ROW WHEN (NEW.key LIKE '{STUDY_NOTE_LIKE}') "
            f"EXECUTE PROCEDURE {TRIGGER}()",
        ])]
    if dialect in ("mysql", "mariadb"):
        return [
            (f"{STUDY_NOTE_TRIGGER}_{e.lower()}", [
                f"CREATE TRIGGER {STUDY_NOTE_TRIGGER}_{e.lower()} AFTER {e} "
                "ON study_system_attributes FOR EACH ROW "
                f"BEGIN IF NEW.`key` LIKE '{STUDY_NOTE_LIKE}' THEN {insert.format(k='`key`')}; "
                "END IF; END"
            ]) for e in events
        ]
    raise InstallError(f"unsupported database dialect {dialect!r}")


def _trial_note_trigger_ddl(dialect: str) -> list[tuple[str, list[str]]]:
    """(trigger name, statements creating it) per dialect."""
    insert = (
        "INSERT INTO hitl_note_changes (study_id, attr_key) VALUES (NEW.study_id, NEW.{key})"
    )
    if dialect == "sqlite":
        return [
            (
                f"{TRIGGER}_{event.lower()}",
                [
                    f"CREATE TRIGGER IF NOT EXISTS {TRIGGER}_{event.lower()} AFTER {event} "
                    f"ON study_system_attributes WHEN NEW.key LIKE '{NOTE_LIKE}' "
                    f"BEGIN {insert.format(key='key')}; END"
                ],
            )
            for event in ("INSERT", "UPDATE")
        ] + [
            # Counts the writes for the sweep's watch (wake.py): SQLite gives a deleted row's
            # id to the next row, so the queue's ids cannot tell a new row from an old one.
            (
                f"{COUNTER_TRIGGER}_{event.lower()}",
                [
                    f"CREATE TRIGGER IF NOT EXISTS {COUNTER_TRIGGER}_{event.lower()} AFTER "
                    f"{event} ON study_system_attributes WHEN NEW.key LIKE '{NOTE_LIKE}' "
                    f"BEGIN UPDATE hitl_meta SET value = CAST(value AS INTEGER) + 1 "
                    f"WHERE name = '{NOTE_WRITES}'; END"
                ],
            )
            for event in ("INSERT", "UPDATE")
        ]
    if dialect == "postgresql":
        return [
            (
                TRIGGER,
                [
                    _pg_function(TRIGGER),
                    f"CREATE TRIGGER {TRIGGER} AFTER INSERT OR UPDATE ON study_system_attributes "
                    f"FOR EACH ROW WHEN (NEW.key LIKE '{NOTE_LIKE}') "
                    f"EXECUTE PROCEDURE {TRIGGER}()",
                ],
            )
        ]
    if dialect in ("mysql", "mariadb"):
        return [
            (
                f"{TRIGGER}_{event.lower()}",
                [
                    f"CREATE TRIGGER {TRIGGER}_{event.lower()} AFTER {event} "
                    "ON study_system_attributes FOR EACH ROW "
                    f"BEGIN IF NEW.`key` LIKE '{NOTE_LIKE}' THEN {insert.format(key='`key`')}; "
                    "END IF; END"
                ],
            )
            for event in ("INSERT", "UPDATE")
        ]
    raise InstallError(f"unsupported database dialect {dialect!r}")



def _fail_trigger_ddl(dialect: str) -> list[tuple[str, list[str]]]:
    """A trigger on ``trials``: a worker's PRUNED becomes FAIL when a human asked FAIL.

    Optuna's ``study.optimize`` re-raises every exception of the objective except TrialPruned
    (unless it is in ``catch``), and refuses to tell a trial someone else finished. So the only
    way a worker ends its trial and carries on is TrialPruned: HumanInTheLoopPruner answers
    ``should_prune() -> True`` to a FAIL request too, and this trigger turns that PRUNED into
    FAIL in the worker's own update, so no other process ever sees the trial PRUNED.
    """
    requested = (
        "EXISTS (SELECT 1 FROM hitl_requests r WHERE r.trial_id = NEW.trial_id "
        "AND r.target = 'FAIL')"
    )
    if dialect == "sqlite":
        # SQLite cannot change NEW in a BEFORE trigger; the update in an AFTER trigger belongs
        # to the same statement's transaction (and triggers do not recurse by default).
        return [(FAIL_TRIGGER, [
            f"CREATE TRIGGER IF NOT EXISTS {FAIL_TRIGGER} AFTER UPDATE OF state ON trials "
            f"WHEN OLD.state = 'RUNNING' AND NEW.state = 'PRUNED' AND {requested} "
            "BEGIN UPDATE trials SET state = 'FAIL' WHERE trial_id = NEW.trial_id; END"
        ])]
    if dialect == "postgresql":
        return [(FAIL_TRIGGER, [
            _pg_function(FAIL_TRIGGER),
            f"CREATE TRIGGER {FAIL_TRIGGER} BEFORE UPDATE OF state ON trials FOR EACH ROW "
            "WHEN (OLD.state = 'RUNNING' AND NEW.state = 'PRUNED') "
            f"EXECUTE PROCEDURE {FAIL_TRIGGER}()",
        ])]
    if dialect in ("mysql", "mariadb"):
        return [(FAIL_TRIGGER, [
            f"CREATE TRIGGER {FAIL_TRIGGER} BEFORE UPDATE ON trials FOR EACH ROW "
            f"BEGIN IF OLD.state = 'RUNNING' AND NEW.state = 'PRUNED' AND {requested} "
            "THEN SET NEW.state = 'FAIL'; END IF; END"
        ])]
    raise InstallError(f"unsupported database dialect {dialect!r}")


def _pg_function_current(conn: sa.Connection, name: str) -> bool:
    """Whether the function ``name`` has this version's body."""
    source = conn.execute(
        sa.text("SELECT prosrc FROM pg_proc WHERE proname = :n AND "
                "pronamespace = current_schema()::regnamespace"),
        {"n": name},
    ).scalar()
    return source is not None and source.strip() == PG_FUNCTIONS[name]


def _trigger_exists(conn: sa.Connection, name: str) -> bool:
    dialect = conn.dialect.name
    if dialect == "sqlite":
        sql = "SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND name = :n"
    elif dialect == "postgresql":
        sql = "SELECT 1 FROM pg_trigger WHERE tgname = :n AND NOT tgisinternal"
    else:
        sql = (
            "SELECT 1 FROM information_schema.TRIGGERS "
            "WHERE TRIGGER_SCHEMA = DATABASE() AND TRIGGER_NAME = :n"
        )
    return conn.execute(sa.text(sql), {"n": name}).first() is not None


def _utcnow() -> datetime.datetime:
    # Optuna's RDB storage keeps naive UTC datetimes; ours follow it.
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


class SqlStore:
    retroactive_supported = True

    def __init__(self, storage: RDBStorage) -> None:
        self._engine: sa.Engine = storage.engine

    @property
    def engine(self) -> sa.Engine:
        return self._engine

    def install(self) -> None:
        """Create our tables and triggers if missing. Safe to run from several processes."""
        # Trigger DDL goes through the raw cursor, whose errors SQLAlchemy does not wrap.
        dbapi_error = self._engine.dialect.loaded_dbapi.Error
        try:
            for attempt in range(ATTEMPTS):
                try:
                    metadata.create_all(self._engine, checkfirst=True)
                    _add_columns(self._engine)
                    self._install_indexes()
                    self._install_triggers()
                    self._bootstrap()
                    return
                except (sa.exc.OperationalError, sa.exc.ProgrammingError,
                        sa.exc.IntegrityError, dbapi_error) as exc:
                    # Another process may be installing at the same moment: look again.
                    if attempt == ATTEMPTS - 1:
                        raise
                    logger.debug("install raced another process (%s); retrying", exc)
        except (sa.exc.DBAPIError, dbapi_error) as exc:
            raise InstallError(
                "hitl-pruner could not create its tables and triggers "
                f"(hitl_audit, hitl_note_changes, hitl_requests, hitl_workers, {TRIGGER}*, "
                f"{FAIL_TRIGGER}): "
                f"{getattr(exc, 'orig', exc)}. The database user "
                "needs CREATE and TRIGGER privileges on the Optuna database (MySQL with binary "
                "logging also needs log_bin_trust_function_creators=1)."
            ) from None

    def _install_indexes(self) -> None:
        """Add the audit listing's indexes to a hitl_audit made by an older version.

        create_all makes a table's indexes only with the table. Concurrent installs are
        retried by install(), and then find the index made.
        """
        with self._engine.begin() as conn:
            have = {index["name"] for index in sa.inspect(conn).get_indexes(audit_t.name)}
            for index in AUDIT_LISTING_INDEXES:
                if index.name not in have:
                    logger.info("adding the index %s to %s", index.name, audit_t.name)
                    index.create(conn)

    def _install_triggers(self) -> None:
        with self._engine.begin() as conn:
            dialect = conn.dialect.name
            # The raw cursor with no parameters: pyformat drivers would read LIKE's % as a
            # placeholder.
            cursor = conn.connection.cursor()
            if dialect == "sqlite":
                cursor.execute(
                    f"INSERT OR IGNORE INTO hitl_meta (name, value) VALUES ('{NOTE_WRITES}', '0')"
                )
            study_note_triggers_made = False
            for name, statements in _trigger_ddl(dialect) + _fail_trigger_ddl(dialect):
                if not _trigger_exists(conn, name):
                    for statement in statements:
                        cursor.execute(statement)
                    study_note_triggers_made |= name.startswith(STUDY_NOTE_TRIGGER)
            if study_note_triggers_made:
                # A STOP already in a study's note (written before this database had these
                # triggers: before the first start, or under an older version) is queued once
                # now, so the first sweep applies it as it would a new one.
                conn.execute(sa.insert(changes_t).from_select(
                    ["study_id", "attr_key"],
                    sa.select(attrs_t.c.study_id, attrs_t.c.key)
                    .where(attrs_t.c.key == note_ver_key(None)),
                ))
            if dialect == "postgresql":
                for name in PG_FUNCTIONS:
                    if not _pg_function_current(conn, name):
                        logger.info("upgrading the trigger function %s()", name)
                        cursor.execute(_pg_function(name))

    def _bootstrap(self) -> None:
        """Queue every note written before the triggers existed, once per database."""
        try:
            with self._engine.begin() as conn:
                done = sa.select(meta_t.c.value).where(meta_t.c.name == "bootstrapped")
                if conn.execute(done).first():
                    return
                marker = {"name": "bootstrapped", "value": _utcnow().isoformat()}
                conn.execute(sa.insert(meta_t).values(**marker))
                conn.execute(
                    sa.insert(changes_t).from_select(
                        ["study_id", "attr_key"],
                        sa.select(attrs_t.c.study_id, attrs_t.c.key).where(
                            attrs_t.c.key.like("dashboard:%:note_ver")
                        ),
                    )
                )
                # Where these notes end in the queue: the sweep lists, and does not apply,
                # those that would relabel a finished trial (first_start.py).
                upto = conn.execute(sa.select(sa.func.max(changes_t.c.id))).scalar()
                conn.execute(sa.insert(meta_t).values(name=EXISTING_UPTO, value=str(upto or 0)))
        except sa.exc.IntegrityError:
            pass  # another process inserted the marker first, and queued the notes with it

    def uninstall(self) -> None:
        with self._engine.begin() as conn:
            dialect = conn.dialect.name
            for table, ddl in (("study_system_attributes", _trigger_ddl),
                               ("trials", _fail_trigger_ddl)):
                for name, _ in ddl(dialect):
                    on = f" ON {table}" if dialect == "postgresql" else ""
                    conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {name}{on}")
            if dialect == "postgresql":
                conn.exec_driver_sql(f"DROP FUNCTION IF EXISTS {TRIGGER}()")
                conn.exec_driver_sql(f"DROP FUNCTION IF EXISTS {FAIL_TRIGGER}()")
        metadata.drop_all(self._engine, checkfirst=True)

    def trials(self, trial_ids: Iterable[int]) -> dict[int, TrialRef]:
        ids = sorted(set(trial_ids))
        if not ids:
            return {}
        query = (
            sa.select(
                trials_t.c.trial_id,
                trials_t.c.study_id,
                studies_t.c.study_name,
                trials_t.c.number,
                trials_t.c.state,
            )
            .join(studies_t, studies_t.c.study_id == trials_t.c.study_id)
            .where(trials_t.c.trial_id.in_(ids))
        )
        with self._engine.connect() as conn:
            return {row.trial_id: TrialRef(*row) for row in conn.execute(query)}

    def last_changes(self, trial_ids: Iterable[int]) -> dict[int, LastChange]:
        ids = sorted(set(trial_ids))
        if not ids:
            return {}
        newest = (
            sa.select(sa.func.max(audit_t.c.id))
            .where(audit_t.c.trial_id.in_(ids))
            .group_by(audit_t.c.trial_id)
        )
        query = sa.select(audit_t).where(audit_t.c.id.in_(newest))
        with self._engine.connect() as conn:
            return {
                row.trial_id: LastChange(
                    TrialState[row.to_state], bool(row.retroactive), source=row.source,
                    user=row.user_name, how=row.how, from_state=TrialState[row.from_state],
                    note_version=row.note_version,
                )
                for row in conn.execute(query)
            }

    def transition(self, entry: AuditEntry, request: Request | None = None) -> None:
        with self._engine.begin() as conn:
            _transition(conn, entry, request)

    def transition_many(self, entries: Sequence[AuditEntry]) -> list[AuditEntry]:
        if not entries:
            return []
        try:
            with self._engine.begin() as conn:
                _transition_many(conn, entries)
        except LostRace:
            return list(entries)  # rolled back: the caller writes them one at a time
        except sa.exc.DBAPIError as exc:
            if not _conflict(exc):
                raise
            # The database chose this transaction as a deadlock's victim and rolled it back
            # (rows of the batch were being written by someone else): one at a time, then.
            logger.info("a batch of %d state changes met a concurrent writer (%s)",
                        len(entries), exc.orig)
            return list(entries)
        return []

    def worker(self, ref: TrialRef, *, alive_for: float = DEFAULT_ALIVE_FOR) -> Worker:
        """What we know of a RUNNING trial's worker: only evidence, see requests.evidence."""
        return self.workers([ref], alive_for=alive_for).get(ref.trial_id, Worker(False))

    def workers(self, refs: Iterable[TrialRef], *,
                alive_for: float = DEFAULT_ALIVE_FOR) -> dict[int, Worker]:
        ids = sorted({ref.trial_id for ref in refs})
        if not ids:
            return {}
        trial_id = trials_t.c.trial_id
        query = sa.select(
            trial_id,
            sa.exists().where(
                trial_attrs_t.c.trial_id == trial_id, trial_attrs_t.c.key == COOPERATIVE_ATTR
            ),
            sa.exists().where(steps_t.c.trial_id == trial_id),
            sa.select(requests_t.c.target)
            .where(requests_t.c.trial_id == trial_id)
            .scalar_subquery(),
            sa.select(db_clock() - sa.func.max(workers_t.c.seen_at))
            .where(workers_t.c.study_id == trials_t.c.study_id)
            .scalar_subquery(),
            # Workers that reach the database through the gRPC proxy beat in study system
            # attrs, on their own clock (requests.WORKER_ATTR_PREFIX); an exited one's is null.
            sa.select(db_clock() - sa.func.max(sa.cast(attrs_t.c.value_json, sa.Double)))
            .where(attrs_t.c.study_id == trials_t.c.study_id,
                   attrs_t.c.key.like(f"{WORKER_ATTR_PREFIX}%"),
                   attrs_t.c.value_json != "null")
            .scalar_subquery(),
        ).where(trial_id.in_(ids))
        found: dict[int, Worker] = {}
        with self._engine.connect() as conn:
            for tid, marked, reported, target, *ago in conn.execute(query):
                seen = [max(0.0, float(a)) for a in ago if a is not None]
                why = evidence(
                    marked=bool(marked),
                    reported=bool(reported),
                    seen_ago=min(seen) if seen else None,
                    alive_for=alive_for,
                )
                found[tid] = Worker(
                    why is not None, TrialState[target] if target else None, why or ""
                )
        return found

    def ask(self, request: Request, replaces: TrialState | None) -> None:
        try:
            with self._engine.begin() as conn:
                if replaces is not None:
                    replaced = conn.execute(
                        sa.delete(requests_t)
                        .where(requests_t.c.trial_id == request.trial_id)
                        .where(requests_t.c.target == replaces.name)
                    )
                    if replaced.rowcount != 1:
                        raise LostRace()
                # Only while the trial runs: the caller may have read it before the sweep and
                # its worker ended it (a request for an ended trial would be settled as if the
                # worker had heeded it).
                row = _request_row(request)
                values = sa.select(
                    *(sa.literal(value, requests_t.c[name].type) if value is not None
                      else sa.null() for name, value in row.items())
                ).where(trials_t.c.trial_id == request.trial_id,
                        trials_t.c.state == TrialState.RUNNING)
                if conn.execute(
                    sa.insert(requests_t).from_select(list(row), values)
                ).rowcount != 1:
                    raise LostRace()
                # Where a worker without SQL of its own reads it (api_channel.py): the RUNNING
                # trial's system attr, in the same transaction.
                _set_request_attr(conn, request.trial_id, request_value(request.target))
        except sa.exc.IntegrityError:
            # Another server (or our sweep) asked between our read and our insert.
            raise LostRace() from None

    def claim(self, ref: TrialRef, note_version: int, target: TrialState, source: str,
              user: str | None) -> AuditEntry | Request | None:
        mine = {"source": source, "user_name": user}
        by_sweep = (
            requests_t.c.trial_id == ref.trial_id,
            requests_t.c.note_version == note_version,
            requests_t.c.target == target.name,
            requests_t.c.source == SWEEP,
        )
        audited = (
            audit_t.c.trial_id == ref.trial_id,
            audit_t.c.note_version == note_version,
            audit_t.c.to_state == target.name,
            audit_t.c.source == SWEEP,
        )
        with self._engine.begin() as conn:
            claimed: AuditEntry | Request | None = None
            for row in conn.execute(sa.select(audit_t).where(*audited)).all():
                if conn.execute(
                    sa.update(audit_t).where(audit_t.c.id == row.id, *audited).values(**mine)
                ).rowcount == 1:
                    claimed = _audit_entry(row)
            request = conn.execute(sa.select(requests_t).where(*by_sweep)).first()
            if request is not None and conn.execute(
                sa.update(requests_t).where(*by_sweep).values(**mine)
            ).rowcount == 1:
                claimed = _request(request)
        if isinstance(claimed, AuditEntry):
            return dataclasses.replace(claimed, source=source, user=user)
        if isinstance(claimed, Request):
            return dataclasses.replace(claimed, source=source, user=user)
        return None

    def requests(self, study_ids: set[int] | None) -> list[tuple[Request, TrialState | None]]:
        query = (
            sa.select(requests_t, trials_t.c.state.label("trial_state"))
            .join(trials_t, trials_t.c.trial_id == requests_t.c.trial_id, isouter=True)
            .order_by(requests_t.c.deadline)
        )
        if study_ids is not None:
            if not study_ids:
                return []
            query = query.where(requests_t.c.study_id.in_(sorted(study_ids)))
        with self._engine.connect() as conn:
            return [
                (_request(row), _state(row.trial_state)) for row in conn.execute(query)
            ]

    def settle(self, request: Request, entry: AuditEntry | None) -> bool:
        with self._engine.begin() as conn:
            # Only the request as we read it: one claimed by a note-save meanwhile (see claim)
            # is settled by the next sweep, under the save's name.
            result = conn.execute(sa.delete(requests_t).where(*_same_request(request)))
            if result.rowcount != 1:
                return False
            _set_request_attr(conn, request.trial_id, None)
            if entry is not None:
                conn.execute(sa.insert(audit_t).values(**_audit_row(entry)))
        return True

    def notes(self, study_id: int, trial_ids: Iterable[int]) -> dict[int, Note]:
        remaining = sorted(set(trial_ids))
        versions: dict[int, int] = {}
        chunks: dict[int, dict[int, str]] = {tid: {} for tid in remaining}
        first, count = 0, FIRST_CHUNKS
        with self._engine.connect() as conn:
            while remaining:
                keys = [
                    f"{note_str_key_prefix(tid)}{i}"
                    for tid in remaining
                    for i in range(first, first + count)
                ]
                if first == 0:
                    keys += [note_ver_key(tid) for tid in remaining]
                rows = conn.execute(
                    sa.select(attrs_t.c.key, attrs_t.c.value_json)
                    .where(attrs_t.c.study_id == study_id)
                    .where(attrs_t.c.key.in_(keys))
                )
                for key, value_json in rows:
                    tid = int(key.split(":", 2)[1])
                    if key.endswith(":note_ver"):
                        versions[tid] = int(json.loads(value_json))
                    else:
                        chunks[tid][int(key.rsplit(":", 1)[1])] = json.loads(value_json)
                first, count = first + count, CHUNKS_PER_QUERY
                remaining = [tid for tid in remaining if len(chunks[tid]) == first]
        return {
            tid: Note(version, "".join(chunks[tid][i] for i in range(len(chunks[tid]))))
            for tid, version in versions.items()
        }

    def study_ids(self, names: Iterable[str]) -> set[int]:
        with self._engine.connect() as conn:
            rows = conn.execute(
                sa.select(studies_t.c.study_id).where(studies_t.c.study_name.in_(list(names)))
            )
            return {row.study_id for row in rows}

    def pending(self, study_ids: set[int] | None, limit: int, *, after: int = 0) -> list[Change]:
        # ``after``: the last id of the round's previous page. Reading past it, not from the
        # start, keeps InnoDB from stepping over the rows just acked (delete-marked until purged)
        # once per page; a row committed meanwhile under a lower id waits for the next round.
        query = (
            sa.select(changes_t).where(changes_t.c.id > after).order_by(changes_t.c.id)
            .limit(limit)
        )
        if study_ids is not None:
            if not study_ids:
                return []
            query = query.where(changes_t.c.study_id.in_(sorted(study_ids)))
        with self._engine.connect() as conn:
            rows = conn.execute(query).all()
        changes = []
        for row in rows:
            match = NOTE_KEY.match(row.attr_key)
            # A key the trigger's LIKE let through but that is no trial note: drop it with the rest.
            changes.append(Change(row.id, row.study_id, int(match.group(1)) if match else -1))
        return changes

    def ack(self, changes: Iterable[Change]) -> None:
        ids = [c.id for c in changes]
        if not ids:
            return  # an idle sweep takes no connection for nothing
        with self._engine.begin() as conn:
            for start in range(0, len(ids), 500):
                batch = ids[start : start + 500]
                conn.execute(sa.delete(changes_t).where(changes_t.c.id.in_(batch)))

    def handled(self, ref: TrialRef, note_version: int) -> None:
        ver_key = note_ver_key(ref.trial_id)
        # One statement, one snapshot: the queue rows of this trial's note, and its version. A
        # later write (another version) commits its version row first, so when the version
        # read is ours, none of its queue rows is among those read.
        query = (
            sa.select(changes_t.c.id, attrs_t.c.value_json)
            .join(attrs_t, sa.and_(attrs_t.c.study_id == changes_t.c.study_id,
                                   attrs_t.c.key == ver_key))
            .where(changes_t.c.study_id == ref.study_id)
            .where(sa.or_(changes_t.c.attr_key == ver_key,
                          changes_t.c.attr_key.like(f"{note_str_key_prefix(ref.trial_id)}%")))
        )
        with self._engine.begin() as conn:
            ids = [row.id for row in conn.execute(query)
                   if int(json.loads(row.value_json)) == note_version]
            if ids:
                conn.execute(sa.delete(changes_t).where(changes_t.c.id.in_(ids)))

    def save_note(self, ref: TrialRef, note: Note, entry: AuditEntry | None = None) -> Note | None:
        """Save a trial's note as the dashboard's note API does, in one transaction; with
        ``entry``, the trial's change and its audit row go into the same transaction.

        Saved only as the stored version + 1, compare-and-set on the stored version row (the
        dashboard reads the version and writes later, so two saves of one version can both
        pass its check). Returns None when saved, else the stored note (its 409). Raises
        LostRace, saving nothing, when ``entry``'s trial has left ``entry.from_state``.

        The dashboard reads all the study's system attributes twice and commits once per
        write; here a save reads one row and commits once. With ``entry`` the note's queue rows
        go too: it is applied, and nothing is left for the sweep.
        """
        ver_key = note_ver_key(ref.trial_id)
        prefix = note_str_key_prefix(ref.trial_id)
        chunks = {
            key: json.dumps(text) for key, text in split_body(note.body, ref.trial_id).items()
        }
        in_study = attrs_t.c.study_id == ref.study_id
        try:
            with self._engine.begin() as conn:
                stored = conn.execute(
                    sa.select(attrs_t.c.value_json).where(in_study, attrs_t.c.key == ver_key)
                ).scalar()
                if note.version != (int(json.loads(stored)) if stored is not None else 0) + 1:
                    raise _NoteConflict()
                version = json.dumps(note.version)
                if stored is None:
                    conn.execute(sa.insert(attrs_t).values(
                        study_id=ref.study_id, key=ver_key, value_json=version))
                elif conn.execute(
                    sa.update(attrs_t)
                    .where(in_study, attrs_t.c.key == ver_key, attrs_t.c.value_json == stored)
                    .values(value_json=version)
                ).rowcount != 1:
                    raise _NoteConflict()  # another save of this version committed meanwhile
                for key, value in chunks.items():
                    if conn.execute(
                        sa.update(attrs_t).where(in_study, attrs_t.c.key == key)
                        .values(value_json=value)
                    ).rowcount == 0:
                        conn.execute(sa.insert(attrs_t).values(
                            study_id=ref.study_id, key=key, value_json=value))
                # The chunks of a longer earlier text are emptied, as the dashboard does.
                conn.execute(
                    sa.update(attrs_t)
                    .where(in_study, attrs_t.c.key.startswith(prefix, autoescape=True),
                           attrs_t.c.key.not_in(list(chunks)), attrs_t.c.value_json != '""')
                    .values(value_json='""')
                )
                if entry is not None:
                    _transition(conn, entry, None)
                    conn.execute(
                        sa.delete(changes_t).where(changes_t.c.study_id == ref.study_id).where(
                            sa.or_(changes_t.c.attr_key == ver_key,
                                   changes_t.c.attr_key.startswith(prefix, autoescape=True))
                        )
                    )
        except (_NoteConflict, sa.exc.IntegrityError):
            # IntegrityError: another first save of this note inserted its version row first.
            return self.notes(ref.study_id, [ref.trial_id]).get(ref.trial_id, Note(0, ""))
        return None

    def save_notes(
        self, items: Sequence[tuple[TrialRef, Note, AuditEntry | None]]
    ) -> dict[int, Note] | None:
        """``save_note`` for many trials of one study, in one transaction and a few statements
        (the bulk action): each note only as its stored version + 1, each entry's change a
        compare-and-set on its trial's state, with its audit row.

        Returns {trial_id: stored note} for the notes not saved because their version is not
        the stored one + 1 (the others are saved); None, saving nothing, when a trial left its
        entry's from_state or a note was written meanwhile: the caller saves them one at a time.
        """
        if not items:
            return {}
        study_id = items[0][0].study_id
        assert all(ref.study_id == study_id for ref, _, _ in items), "one study per call"
        in_study = attrs_t.c.study_id == study_id
        ver_keys = {ref.trial_id: note_ver_key(ref.trial_id) for ref, _, _ in items}
        try:
            with self._engine.begin() as conn:
                stored = {key: value for key, value in conn.execute(
                    sa.select(attrs_t.c.key, attrs_t.c.value_json)
                    .where(in_study, attrs_t.c.key.in_(sorted(ver_keys.values())))
                )}
                conflicts: dict[int, Note] = {}
                saving = []
                for ref, note, entry in items:
                    old = stored.get(ver_keys[ref.trial_id])
                    if note.version != (int(json.loads(old)) if old is not None else 0) + 1:
                        conflicts[ref.trial_id] = note
                    else:
                        saving.append((ref, note, entry, old))
                updates = [{"b_key": ver_keys[ref.trial_id], "b_old": old,
                            "b_new": json.dumps(note.version)}
                           for ref, note, _, old in saving if old is not None]
                if updates and conn.execute(
                    sa.update(attrs_t)
                    .where(in_study, attrs_t.c.key == sa.bindparam("b_key"),
                           attrs_t.c.value_json == sa.bindparam("b_old"))
                    .values(value_json=sa.bindparam("b_new")), updates,
                ).rowcount != len(updates):
                    raise LostRace()  # another save of one of these versions committed
                inserts = [{"study_id": study_id, "key": ver_keys[ref.trial_id],
                            "value_json": json.dumps(note.version)}
                           for ref, note, _, old in saving if old is None]
                # The chunks each trial's note has now: written again, added, or emptied.
                saved_ids = {ref.trial_id for ref, _, _, _ in saving}
                existing = {
                    key for key in conn.execute(
                        sa.select(attrs_t.c.key)
                        .where(in_study, attrs_t.c.key.like("dashboard:%:note_str:%"))
                    ).scalars()
                    if (m := NOTE_KEY.match(key)) and int(m.group(1)) in saved_ids
                }
                chunks = {
                    key: json.dumps(text)
                    for ref, note, _, _ in saving
                    for key, text in split_body(note.body, ref.trial_id).items()
                }
                written = [{"b_key": k, "b_value": v} for k, v in chunks.items() if k in existing]
                written += [{"b_key": k, "b_value": '""'} for k in existing if k not in chunks]
                inserts += [{"study_id": study_id, "key": k, "value_json": v}
                            for k, v in chunks.items() if k not in existing]
                if inserts:
                    conn.execute(sa.insert(attrs_t), inserts)
                if written:
                    conn.execute(
                        sa.update(attrs_t)
                        .where(in_study, attrs_t.c.key == sa.bindparam("b_key"))
                        .values(value_json=sa.bindparam("b_value")), written,
                    )
                entries = [entry for _, _, entry, _ in saving if entry is not None]
                if entries:
                    _transition_many(conn, entries)
                    # Applied with their save: nothing is left for the sweep.
                    done = {e.trial_id for e in entries}
                    keys = [ver_keys[t] for t in done] + [
                        k for k in (*chunks, *existing) if int(k.split(":", 2)[1]) in done]
                    for start in range(0, len(keys), 500):
                        conn.execute(sa.delete(changes_t).where(
                            changes_t.c.study_id == study_id,
                            changes_t.c.attr_key.in_(keys[start:start + 500])))
        except (LostRace, sa.exc.IntegrityError):
            return None
        except sa.exc.DBAPIError as exc:
            if not _conflict(exc):
                raise
            return None
        if conflicts:
            found = self.notes(study_id, conflicts)
            return {tid: found.get(tid, Note(0, "")) for tid in conflicts}
        return {}

    def audit(self, limit: int = 100) -> list[AuditEntry]:
        query = sa.select(audit_t).order_by(audit_t.c.id.desc()).limit(limit)
        with self._engine.connect() as conn:
            return [_audit_entry(row) for row in conn.execute(query)]

    def audit_page(
        self, where: AuditFilter, *, before: int | None = None, limit: int = 100
    ) -> tuple[list[AuditEntry], int | None]:
        query = sa.select(audit_t).where(*_audit_where(where))
        if before is not None:
            query = query.where(audit_t.c.id < before)
        # One more than asked: whether there is a next page, without a count.
        query = query.order_by(audit_t.c.id.desc()).limit(limit + 1)
        with self._engine.connect() as conn:
            rows = conn.execute(query).all()
        entries = [_audit_entry(row) for row in rows[:limit]]
        return entries, (entries[-1].id if len(rows) > limit else None)

    def audit_entry(self, audit_id: int) -> AuditEntry | None:
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(audit_t).where(audit_t.c.id == audit_id)).first()
        return _audit_entry(row) if row is not None else None

    def newest_audit_ids(self, trial_ids: Iterable[int]) -> dict[int, int]:
        ids = sorted(set(trial_ids))
        if not ids:
            return {}
        query = (
            sa.select(audit_t.c.trial_id, sa.func.max(audit_t.c.id))
            .where(audit_t.c.trial_id.in_(ids))
            .group_by(audit_t.c.trial_id)
        )
        with self._engine.connect() as conn:
            return {trial_id: newest for trial_id, newest in conn.execute(query)}


# Errors after which the database has rolled the transaction back, and the same writes may be
# tried again: PostgreSQL's deadlock and serialization failure, MySQL's deadlock and lock wait
# timeout.
PG_CONFLICTS = ("40P01", "40001")
MYSQL_CONFLICTS = (1213, 1205)


class _NoteConflict(Exception):
    """The note's version is not the stored version + 1: the transaction writes nothing."""


def _transition(conn: sa.Connection, entry: AuditEntry, request: Request | None) -> None:
    """SqlStore.transition's writes, in the caller's transaction; LostRace rolls it back."""
    values: dict[str, object] = {"state": entry.to_state}
    if entry.from_state in (TrialState.RUNNING, TrialState.WAITING):
        values["datetime_complete"] = _utcnow()
        if entry.from_state == TrialState.WAITING:
            values["datetime_start"] = values["datetime_complete"]
    result = conn.execute(
        sa.update(trials_t)
        .where(trials_t.c.trial_id == entry.trial_id)
        .where(trials_t.c.state == entry.from_state)
        .values(**values)
    )
    if result.rowcount != 1:
        raise LostRace()
    # The trial's state is final now: a request still open for it is answered.
    closed = conn.execute(
        sa.delete(requests_t).where(requests_t.c.trial_id == entry.trial_id)
        .where(*(_same_request(request) if request is not None else ()))
    )
    if request is not None and closed.rowcount != 1:
        raise LostRace()  # the request changed since we read it: leave it be
    conn.execute(sa.insert(audit_t).values(**_audit_row(entry)))


def _transition_many(conn: sa.Connection, entries: Sequence[AuditEntry]) -> None:
    """SqlStore.transition_many's writes, in the caller's transaction; LostRace when a trial
    has left its from_state (the caller rolls back)."""
    now = _utcnow()
    # One executemany per set of columns a change writes: a trial that ran gets its
    # completion time (and a waiting one its start), as in transition().
    by_kind: dict[TrialState | None, list[dict[str, object]]] = {}
    # In the order of the trials' ids, so that two servers writing batches at once lock the
    # rows in one order: the second waits for the first, and finds its trials changed.
    for kind, entry in sorted(
        ((e.from_state if e.from_state in ACTIVE else None, e) for e in entries),
        key=lambda pair: (
            0 if pair[0] is None else ACTIVE.index(pair[0]) + 1, pair[1].trial_id
        ),
    ):
        by_kind.setdefault(kind, []).append(
            {"b_trial": entry.trial_id, "b_from": entry.from_state, "b_to": entry.to_state}
        )
    state_type = trials_t.c.state.type
    written = 0
    for kind, rows in by_kind.items():
        values: dict[str, object] = {"state": sa.bindparam("b_to", type_=state_type)}
        if kind is not None:
            values["datetime_complete"] = now
            if kind == TrialState.WAITING:
                values["datetime_start"] = now
        written += conn.execute(
            sa.update(trials_t)
            .where(trials_t.c.trial_id == sa.bindparam("b_trial"))
            .where(trials_t.c.state == sa.bindparam("b_from", type_=state_type))
            .values(**values),
            rows,
        ).rowcount
    # The drivers sum an executemany's rows (pysqlite, psycopg2, PyMySQL).
    if written != len(entries):
        raise LostRace()
    # Their states are final now: a request still open for one is answered.
    conn.execute(sa.delete(requests_t).where(
        requests_t.c.trial_id.in_(sorted(e.trial_id for e in entries))
    ))
    conn.execute(sa.insert(audit_t), [_audit_row(entry) for entry in entries])


def _add_columns(engine: sa.Engine) -> None:
    """Columns added to our tables after their first release, added to a table made before."""
    for table in (audit_t, requests_t):
        have = {column["name"] for column in sa.inspect(engine).get_columns(table.name)}
        if "reason" not in have:
            with engine.begin() as conn:
                conn.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN reason VARCHAR(500)")


def _set_request_attr(conn: sa.Connection, trial_id: int, value: object | None) -> None:
    """Write (or, with None, delete) the trial's REQUEST_ATTR, as Optuna would store it."""
    conn.execute(sa.delete(trial_attrs_t).where(trial_attrs_t.c.trial_id == trial_id,
                                                 trial_attrs_t.c.key == REQUEST_ATTR))
    if value is not None:
        conn.execute(sa.insert(trial_attrs_t).values(
            trial_id=trial_id, key=REQUEST_ATTR, value_json=json.dumps(value)
        ))


def _conflict(exc: sa.exc.DBAPIError) -> bool:
    orig = exc.orig
    code = getattr(orig, "pgcode", None)
    if code is not None:
        return code in PG_CONFLICTS
    args: tuple[object, ...] = tuple(getattr(orig, "args", ()))
    return type(orig).__module__.startswith("pymysql") and bool(args) and (
        args[0] in MYSQL_CONFLICTS
    )


def _audit_where(where: AuditFilter) -> list[sa.ColumnElement[bool]]:
    """``where`` in SQL: the same test as AuditFilter.matches, each in a shape an index of
    AUDIT_LISTING_INDEXES serves (equalities on its leading columns)."""
    c = audit_t.c
    clauses: list[sa.ColumnElement[bool]] = []
    if where.study_id is not None:
        clauses.append(c.study_id == where.study_id)
    if where.trial_number is not None:
        clauses.append(c.trial_number == where.trial_number)
    if where.user is not None:
        clauses.append(c.user_name == where.user)
    if where.action == "prune":
        clauses.append(c.to_state == TrialState.PRUNED.name)
    elif where.action == "fail":
        clauses.append(c.to_state == TrialState.FAIL.name)
    elif where.action == "relabel":
        clauses += [c.retroactive == sa.true(), c.is_undo == sa.false()]
    elif where.action == "undo":
        clauses += [c.retroactive == sa.true(), c.is_undo == sa.true()]
    elif where.action == "stop":
        # Study-level rows (audit.STUDY_ROW): the only ones that end RUNNING.
        clauses += [c.to_state == TrialState.RUNNING.name, c.trial_id == STUDY_ROW]
    elif where.action is not None:
        raise ValueError(f"unknown action {where.action!r}")
    return clauses


def _audit_row(entry: AuditEntry) -> dict[str, object]:
    return {
        "created_at": entry.at.astimezone(datetime.timezone.utc).replace(tzinfo=None),
        "study_id": entry.study_id,
        "study_name": entry.study_name,
        "trial_id": entry.trial_id,
        "trial_number": entry.trial_number,
        "from_state": entry.from_state.name,
        "to_state": entry.to_state.name,
        "note_version": entry.note_version,
        "user_name": entry.user,
        "source": entry.source,
        "retroactive": entry.retroactive,
        "is_undo": entry.undo,
        "how": entry.how,
        "reason": entry.reason[:500] if entry.reason else None,
    }


def _request_row(request: Request) -> dict[str, object]:
    return {
        "trial_id": request.trial_id,
        "study_id": request.study_id,
        "study_name": request.study_name,
        "trial_number": request.trial_number,
        "target": request.target.name,
        "note_version": request.note_version,
        "user_name": request.user,
        "source": request.source,
        "requested_at": _naive_utc(request.requested_at),
        "deadline": _naive_utc(request.deadline),
        "reason": request.reason[:500] if request.reason else None,
    }


def _same_request(request: Request) -> tuple[sa.ColumnElement[bool], ...]:
    """The open request row exactly as ``request`` was read: same target, source and user."""
    return (
        requests_t.c.trial_id == request.trial_id,
        requests_t.c.target == request.target.name,
        requests_t.c.source == request.source,
        requests_t.c.user_name.is_not_distinct_from(request.user),
        requests_t.c.note_version.is_not_distinct_from(request.note_version),
    )


def _request(row: sa.Row) -> Request:
    return Request(
        trial_id=row.trial_id,
        study_id=row.study_id,
        study_name=row.study_name,
        trial_number=row.trial_number,
        target=TrialState[row.target],
        note_version=row.note_version,
        user=row.user_name,
        source=row.source,
        requested_at=row.requested_at.replace(tzinfo=datetime.timezone.utc),
        deadline=row.deadline.replace(tzinfo=datetime.timezone.utc),
        reason=row.reason,
    )


def _state(value: object) -> TrialState | None:
    # SQLAlchemy hands back Optuna's enum column as TrialState; be lenient with plain names.
    if value is None or isinstance(value, TrialState):
        return value
    return TrialState[str(value)]


def _naive_utc(at: datetime.datetime) -> datetime.datetime:
    return at.astimezone(datetime.timezone.utc).replace(tzinfo=None)


def _audit_entry(row: sa.Row) -> AuditEntry:
    return AuditEntry(
        id=row.id,
        at=row.created_at.replace(tzinfo=datetime.timezone.utc),
        study_id=row.study_id,
        study_name=row.study_name,
        trial_id=row.trial_id,
        trial_number=row.trial_number,
        from_state=TrialState[row.from_state],
        to_state=TrialState[row.to_state],
        note_version=row.note_version,
        user=row.user_name,
        source=row.source,
        retroactive=bool(row.retroactive),
        undo=bool(row.is_undo),
        how=row.how,
        reason=row.reason,
    )
