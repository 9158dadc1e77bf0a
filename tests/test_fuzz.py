"""Bad input never gets a 5xx, a traceback or a change: property-based, over every route we answer.

Hypothesis draws bodies (bytes, JSON of any shape, deep nesting, near-valid requests), ids
(ours, other studies', negative, at and past 2**63), extra headers and content types for the
note save, the tell, and each of our own routes, on SQLite and PostgreSQL. Whatever it draws:

- the status is below 500;
- an error (4xx) carries a JSON ``{"reason": <text>}`` and leaves every table as it was;
- nothing is logged at ERROR (no traceback), and no body carries one.

A 2xx or 3xx is allowed: a drawn request may be a valid one (a note saved with the next
version, a FAIL told to a running trial), and then it may change state.
"""

from __future__ import annotations

from dataclasses import dataclass
import io
import json
import logging
import time
from typing import Any
from typing import Iterator

from backends import database
from helpers import app_for
from helpers import snapshot
from hypothesis import HealthCheck
from hypothesis import example
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import optuna
from optuna.storages import RDBStorage
import pytest
import sqlalchemy as sa

EXAMPLES = 100
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI finds a regression, not a coin toss
    database=None,  # no .hypothesis directory in the repository
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
DEEP = 50_000  # RecursionError in json.loads, before the fix


@dataclass
class World:
    url: str
    app: Any
    storage: RDBStorage
    study_id: int
    trial_ids: list[int]
    action_id: int
    errors: list[logging.LogRecord]
    calls: dict[str, int]
    five_xx: int = 0


class _Errors(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.ERROR)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    """One database and one app per backend, with its sweep running (so /healthz says ok)."""
    with database(request.param, tmp_path_factory.mktemp("fuzz")) as url:
        storage = RDBStorage(url)
        study = optuna.create_study(study_name="fuzz", storage=storage)
        optuna.create_study(study_name="other", storage=storage).ask()
        trial_ids = []
        for _ in range(3):
            trial_ids.append(study.ask()._trial_id)
        done = study.ask()
        study.tell(done, 1.0)
        trial_ids.append(done._trial_id)
        study.enqueue_trial({})
        trial_ids.append(max(t._trial_id for t in study.get_trials(deepcopy=False)))  # WAITING
        app = app_for(url, interval=3600)
        app.start_background()
        deadline = time.monotonic() + 30
        while app.sweeper.last_run is None:  # its first sweep, at once; then not for an hour
            assert time.monotonic() < deadline, "the sweep did not run"
            time.sleep(0.05)
        env = _environ("PUT", f"/api/studies/{study._study_id}/{done._trial_id}/note",
                       json.dumps({"version": 1, "body": "FAIL"}).encode(), "application/json")
        status, _, _ = _call(app, env)
        assert status == 204
        with storage.engine.connect() as conn:
            action_id = conn.execute(sa.text("SELECT max(id) FROM hitl_audit")).scalar()
        errors: list[logging.LogRecord] = []
        handler = _Errors(errors)
        logging.getLogger().addHandler(handler)
        world = World(url, app, storage, study._study_id, trial_ids, action_id, errors, {})
        try:
            yield world
        finally:
            logging.getLogger().removeHandler(handler)
            app.stop_background()
            storage.engine.dispose()
            print(f"\n{request.param}: examples per route {world.calls}, 5xx: {world.five_xx}")


def _environ(
    method: str, path: str, body: bytes, content_type: str | None,
    length: str | None = "", extra: dict[str, str] | None = None, query: str = "",
) -> dict[str, Any]:
    env: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "SERVER_NAME": "test",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": "localhost",
        "REMOTE_ADDR": "127.0.0.1",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": io.StringIO(),
        "wsgi.url_scheme": "http",
        "wsgi.version": (1, 0),
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    if content_type is not None:
        env["CONTENT_TYPE"] = content_type
    if length == "":
        env["CONTENT_LENGTH"] = str(len(body))
    elif length is not None:
        env["CONTENT_LENGTH"] = length
    env.update(extra or {})
    return env


def _call(app: Any, env: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    captured: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        captured.update(status=status, headers=headers)
        return lambda _: None

    result = app(env, start_response)
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return int(captured["status"].split()[0]), dict(captured["headers"]), body


def check(world: World, route: str, env: dict[str, Any]) -> None:
    """The property: below 500; an error is JSON with a reason and changes nothing; no traceback."""
    world.calls[route] = world.calls.get(route, 0) + 1
    before = snapshot(world.storage.engine)
    del world.errors[:]
    status, headers, body = _call(world.app, env)
    if status >= 500:
        world.five_xx += 1
    request = (env["REQUEST_METHOD"], env["PATH_INFO"], env.get("CONTENT_TYPE"), body[:300])
    assert status < 500, request
    assert b"Traceback" not in body, request
    assert not world.errors, [r.getMessage() for r in world.errors]
    if status >= 400:
        if env["REQUEST_METHOD"] != "HEAD":
            assert headers.get("Content-Type", "").startswith("application/json"), request
            reason = json.loads(body)["reason"]
            assert isinstance(reason, str) and reason, request
        assert snapshot(world.storage.engine) == before, request


# -- what Hypothesis draws -------------------------------------------------------------------

latin1 = st.text(st.characters(max_codepoint=255), max_size=20)  # a WSGI string
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)
versions = st.integers(min_value=-1, max_value=3) | st.integers() | st.sampled_from(
    [2**63 - 1, 2**63, 10**30, 1.0, "1", None, True]
)
notes = st.fixed_dictionaries(
    {"version": versions, "body": st.text(max_size=40) | st.sampled_from(["PRUNE", "FAIL",
                                                                          "\ud800", None])}
)
tells = st.fixed_dictionaries(
    {"state": st.sampled_from(["Fail", "fail", "FAIL", "Complete", "Running", "Pruned", "", 1,
                               None, ["Fail"]]) | st.text(max_size=10)},
    optional={"values": json_values | st.lists(st.floats(), max_size=3)},
)


def bodies(shaped: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    as_json = shaped.map(lambda v: json.dumps(v).encode("utf-8", "surrogatepass"))
    return st.one_of(  # one_of picks a branch evenly: the near-valid shape gets three
        as_json,
        as_json,
        as_json,
        json_values.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=200),
        st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
        shaped.map(lambda v: json.dumps(v).encode("utf-16")),
    )


content_types = st.one_of(
    st.just("application/json"),
    st.just("application/json"),
    st.just("application/json"),
    st.none(),
    st.sampled_from([
        "application/json", "application/json; charset=utf-8", "APPLICATION/JSON",
        "application/json-rpc", "application/json ", "text/plain", "",
        "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
    ]),
    latin1,
)
lengths = st.one_of(  # "" is the body's true length
    st.just(""), st.just(""), st.just(""), st.none(),
    st.sampled_from(["0", "-1", "abc", "99999999999", "\u0663", " 5"]),
)
extra_headers = st.dictionaries(
    st.sampled_from([
        "HTTP_TRANSFER_ENCODING", "HTTP_IF_NONE_MATCH", "HTTP_ACCEPT_ENCODING", "HTTP_RANGE",
        "HTTP_X_FORWARDED_HOST", "HTTP_X_FORWARDED_PREFIX", "HTTP_COOKIE", "HTTP_AUTHORIZATION",
        "HTTP_X_HITL_OUTCOME", "HTTP_ACCEPT", "SCRIPT_NAME",
    ]),
    st.sampled_from(["chunked", "gzip", "*", "bytes=0-1", "/optuna", ""]) | latin1,
    max_size=3,
)


# An id: ("own", i) is the i-th of the world's trial ids (3 RUNNING, a COMPLETE, a WAITING),
# then its study's id, then its action's id; anything else is written as drawn.
Id = Any
id_strategy = st.one_of(
    st.tuples(st.just("own"), st.integers(0, 6)),
    st.tuples(st.just("own"), st.integers(0, 6)),
    st.tuples(st.just("own"), st.integers(0, 6)),
    st.integers().map(str),
    st.sampled_from([2**63 - 1, 2**63, 2**64, 10**30, -(2**63), 0]).map(str),
    latin1,
)


# A study id: mostly the world's study, whose trials the own ids name.
study_strategy = st.one_of(*[st.just(("own", 5))] * 3, id_strategy)


def resolve(world: World, drawn: Id) -> str:
    if isinstance(drawn, tuple):
        own = [*world.trial_ids, world.study_id, world.action_id]
        return str(own[drawn[1] % len(own)])
    return str(drawn)


# -- the routes --------------------------------------------------------------------------------


@FUZZ
@given(study=study_strategy, trial=id_strategy, body=bodies(notes), ctype=content_types,
       length=lengths, extra=extra_headers)
@example(study=("own", 5), trial=("own", 0), body=b"[" * DEEP + b"]" * DEEP,
         ctype="application/json", length="", extra={})
@example(study=("own", 5), trial=str(2**63), body=b'{"version": 1, "body": "PRUNE"}',
         ctype="application/json", length="", extra={})
def test_note_saves(world: World, study: Id, trial: Id, body: bytes, ctype: str | None,
                    length: str | None, extra: dict[str, str]) -> None:
    path = f"/api/studies/{resolve(world, study)}/{resolve(world, trial)}/note"
    check(world, "note", _environ("PUT", path, body, ctype, length, extra))


@FUZZ
@given(trial=id_strategy, body=bodies(tells), ctype=content_types, length=lengths,
       extra=extra_headers)
@example(trial=("own", 0), body=b'{"state": "Fail", "x": ' + b"[" * DEEP + b"]" * DEEP + b"}",
         ctype="application/json", length="", extra={})
@example(trial=str(2**63), body=b'{"state": "Fail"}', ctype="application/json", length="",
         extra={})
def test_tells(world: World, trial: Id, body: bytes, ctype: str | None, length: str | None,
               extra: dict[str, str]) -> None:
    path = f"/api/trials/{resolve(world, trial)}/tell"
    check(world, "tell", _environ("POST", path, body, ctype, length, extra))


methods = st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "get", "post"])


@FUZZ
@given(method=methods, study=study_strategy, trial=id_strategy, extra=extra_headers)
@example(method="GET", study=("own", 5), trial=str(2**63), extra={})
def test_trial_detail(world: World, method: str, study: Id, trial: Id,
                      extra: dict[str, str]) -> None:
    path = f"/hitl/api/studies/{resolve(world, study)}/{resolve(world, trial)}"
    check(world, "trial detail", _environ(method, path, b"", None, extra=extra))


@FUZZ
@given(method=methods, query=st.one_of(
    st.integers().map(lambda n: f"limit={n}"),
    latin1.map(lambda q: f"limit={q}"),
    latin1,
    st.just("limit=" + "9" * 5000),
), extra=extra_headers)
def test_actions(world: World, method: str, query: str, extra: dict[str, str]) -> None:
    env = _environ(method, "/hitl/api/actions", b"", None, extra=extra, query=query)
    check(world, "actions", env)


@FUZZ
@given(method=methods, action=id_strategy, body=bodies(st.just({})), ctype=content_types,
       length=lengths, extra=extra_headers)
def test_undo(world: World, method: str, action: Id, body: bytes, ctype: str | None,
              length: str | None, extra: dict[str, str]) -> None:
    path = f"/hitl/api/actions/{resolve(world, action)}/undo"
    env = _environ(method, path, body, ctype, length, extra)
    check(world, "undo", env)


@FUZZ
@given(method=methods, name=st.one_of(
    st.sampled_from(["hitl.js", "hitl.css", "actions.html", "../app.py", ".", "..", "%2e%2e"]),
    latin1,
), extra=extra_headers)
def test_static_files(world: World, method: str, name: str, extra: dict[str, str]) -> None:
    check(world, "static", _environ(method, f"/hitl/static/{name}", b"", None, extra=extra))


@FUZZ
@given(method=methods, tail=st.sampled_from(["", "/", "//"]), extra=extra_headers)
def test_actions_page(world: World, method: str, tail: str, extra: dict[str, str]) -> None:
    check(world, "actions page", _environ(method, f"/hitl/actions{tail}", b"", None, extra=extra))


@FUZZ
@given(method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "get"]),
       body=st.binary(max_size=50), extra=extra_headers)
def test_health(world: World, method: str, body: bytes, extra: dict[str, str]) -> None:
    check(world, "healthz", _environ(method, "/healthz", body, None, extra=extra))

