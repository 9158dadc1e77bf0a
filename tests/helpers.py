"""Small tools shared by the tests: studies with trials in every state, and an in-process client."""

from __future__ import annotations

import io
import json
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState
from optuna.trial import create_trial
import sqlalchemy as sa

from hitl_pruner import Settings
from hitl_pruner import create_app


def make_study(url: str, name: str = "s") -> tuple[optuna.Study, dict[str, int]]:
    """A study with one trial per interesting state; returns trial ids by label."""
    # RandomSampler: TPE reads every trial on each ask, which the tests do not need.
    study = optuna.create_study(
        study_name=name, storage=RDBStorage(url), sampler=optuna.samplers.RandomSampler(seed=0)
    )
    # Each trial is written whole, in one transaction (add_trials), not step by step as a worker
    # writes it (ask, report, tell: a transaction each): the same rows in about half the time,
    # and most tests start with this study. The values are those RandomSampler(seed=0) gave.
    x = {"x": optuna.distributions.FloatDistribution(0, 1)}
    labels = ("complete", "complete2", "running", "running2", "pruned_by_worker",
              "failed_by_worker")
    study.add_trials([
        create_trial(state=TrialState.COMPLETE, params={"x": 0.5488135039273248},
                     distributions=x, value=0.1, intermediate_values={0: 0.5, 1: 0.25},
                     user_attrs={"u": "complete"}),
        create_trial(state=TrialState.COMPLETE, params={"x": 0.7151893663724195},
                     distributions=x, value=0.1, intermediate_values={0: 0.5, 1: 0.25},
                     user_attrs={"u": "complete2"}),
        create_trial(state=TrialState.RUNNING, params={"x": 0.6027633760716439},
                     distributions=x, intermediate_values={0: 0.7}),
        create_trial(state=TrialState.RUNNING, params={"x": 0.5448831829968969},
                     distributions=x, intermediate_values={0: 0.7}),
        create_trial(state=TrialState.PRUNED),
        create_trial(state=TrialState.FAIL),
    ])
    study.enqueue_trial({"x": 0.5})
    trials = study.get_trials(deepcopy=False)
    ids = {label: trials[number]._trial_id for number, label in enumerate(labels)}
    ids["waiting"] = trials[-1]._trial_id
    return study, ids


def state(url: str, trial_id: int) -> TrialState:
    """The trial's state as stored (a query; an RDBStorage would check the schema first)."""
    [(name,)] = rows(url, f"SELECT state FROM trials WHERE trial_id = {int(trial_id)}")
    return TrialState[name]


def rows(url: str, sql: str) -> list[sa.Row]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(sql)).all()
    finally:
        engine.dispose()


def snapshot(engine: sa.Engine) -> dict[str, list[str]]:
    """Every row of every table: the trials, their states, notes (system attrs), audit ..."""
    with engine.connect() as conn:
        return {
            table: sorted(repr(tuple(row)) for row in conn.execute(sa.text(
                f"SELECT * FROM {table}"
            )))
            for table in sa.inspect(conn).get_table_names()
        }


def audit_rows(url: str) -> list[sa.Row]:
    """Every hitl_audit row, oldest first."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT * FROM hitl_audit ORDER BY id")).all()
    finally:
        engine.dispose()


def app_for(url: str, **settings: Any) -> Any:
    return create_app(Settings(storage_url=url, **settings), autostart=False)


class Response:
    def __init__(self, status: str, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = int(status.split()[0])
        self.headers = dict(headers)
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def outcome(self) -> dict[str, Any] | None:
        raw = self.headers.get("X-Hitl-Outcome")
        return json.loads(raw) if raw else None


def call(
    app: Any,
    method: str,
    path: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    environ: dict[str, Any] | None = None,
) -> Response:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else b"")
    env = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "test",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(data)),
        "wsgi.input": io.BytesIO(data),
        "wsgi.errors": io.StringIO(),
        "wsgi.url_scheme": "http",
        "wsgi.version": (1, 0),
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        **(environ or {}),
    }
    captured: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        captured["status"], captured["headers"] = status, headers
        return lambda _: None

    result = app(env, start_response)
    try:
        out = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close:
            close()
    return Response(captured["status"], captured["headers"], out)


def save(app: Any, study_id: int, trial_id: int, version: int, body: str, **kw: Any) -> Response:
    return call(
        app, "PUT", f"/api/studies/{study_id}/{trial_id}/note",
        {"version": version, "body": body}, **kw,
    )
