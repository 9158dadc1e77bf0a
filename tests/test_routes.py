"""Every spelling of a route's ids either takes our checked path or is refused unread.

The dashboard's router (bottle) decodes PATH_INFO again as UTF-8 (dropping bytes that are not
UTF-8), strips trailing slashes, and reads an id with any Unicode digit and a minus sign. A
spelling our patterns did not know went to the dashboard's handler with none of our checks:
no allow-list, no audit row, no size limit, no 404 for another study's trial.

Each case is a path as a client sends it; ``as_gunicorn`` turns it into the PATH_INFO that
gunicorn hands over (percent-decoded bytes as latin-1), and a few go through a real gunicorn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
import socket
from typing import Any
from typing import Callable
from typing import Iterator
from urllib.parse import unquote_to_bytes

from backends import BACKENDS
from backends import database
from helpers import app_for
from helpers import call
from helpers import snapshot
import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState
from processes import HOST
from processes import gunicorn_server
import pytest
import sqlalchemy as sa

from hitl_pruner import dashboard
from hitl_pruner import routes

TOO_BIG = 2**63  # one more than the databases' largest id


def as_gunicorn(path: str) -> str:
    """The PATH_INFO gunicorn makes of a request path: percent-decoded bytes, read as latin-1."""
    return unquote_to_bytes(path).decode("latin-1")


def url(text: str) -> str:
    """Percent-encode the UTF-8 bytes of every non-ASCII character, as a browser sends them."""
    return "".join(c if c.isascii() else "".join(f"%{b:02X}" for b in c.encode()) for c in text)


def digits(number: int, zero: str) -> str:
    """The number written with another script's digits (``zero`` is that script's 0)."""
    return "".join(chr(ord(zero) + int(d)) for d in str(number))


ARABIC, FULLWIDTH, DEVANAGARI, BOLD = "\u0660", "\uff10", "\u0966", "\U0001d7ce"


@dataclass(frozen=True)
class World:
    url: str
    app: Any
    storage: RDBStorage
    other_study_id: int


@dataclass(frozen=True)
class Target:
    """What a case acts on: a fresh RUNNING trial, and a retroactive FAIL (audit id) to undo."""

    study_id: int
    trial_id: int
    action_id: int


@pytest.fixture(scope="module", params=BACKENDS)
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
    World
]:
    """One database per backend for the whole table; each case acts on trials of its own."""
    with database(request.param, tmp_path_factory.mktemp("routes")) as storage_url:
        storage = RDBStorage(storage_url)
        other = optuna.create_study(study_name="other", storage=storage)
        app = app_for(storage_url)
        yield World(storage_url, app, storage, other._study_id)
        storage.engine.dispose()


@pytest.fixture
def target(world: World) -> Target:
    study = optuna.create_study(storage=world.storage)
    done = study.ask()
    study.tell(done, 1.0)
    r = call(world.app, "PUT", f"/api/studies/{study._study_id}/{done._trial_id}/note",
             {"version": 1, "body": "FAIL"})
    assert r.outcome["action"] == "applied", r.body
    action_id = audit(world.storage.engine)[-1].id
    return Target(study._study_id, study.ask()._trial_id, action_id)


def audit(engine: sa.Engine) -> list[sa.Row]:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT * FROM hitl_audit ORDER BY id")).all()


# -- the table -----------------------------------------------------------------------------

Spell = Callable[[Target, int], str]


@dataclass(frozen=True)
class Case:
    method: str
    path: Callable[[Target, int], str]  # (target, other study's id) -> the request path
    status: int
    # "refused": nothing changes. "checked": our checks answered, nothing changes. "applied": our
    # checked path changed the trial (outcome header, audit row). "passed": the dashboard's own.
    expect: str
    body: Any = None


def note(study: Spell, trial: Spell, tail: str = "/note") -> Callable[[Target, int], str]:
    return lambda t, o: f"/api/studies/{study(t, o)}/{trial(t, o)}{tail}"


def tell(trial: Spell, tail: str = "/tell") -> Callable[[Target, int], str]:
    return lambda t, o: f"/api/trials/{trial(t, o)}{tail}"


def study_note(study: Spell, tail: str = "/note") -> Callable[[Target, int], str]:
    return lambda t, o: f"/api/studies/{study(t, o)}{tail}"


def s(t: Target, o: int) -> str:
    return str(t.study_id)


def tid(t: Target, o: int) -> str:
    return str(t.trial_id)


def spelled(spell: Callable[[int], str], of: str = "trial") -> Spell:
    return lambda t, o: spell(t.trial_id if of == "trial" else t.study_id)


SPELLINGS: dict[str, Callable[[int], str]] = {
    "arabic-indic": lambda n: url(digits(n, ARABIC)),
    "fullwidth": lambda n: url(digits(n, FULLWIDTH)),
    "devanagari": lambda n: url(digits(n, DEVANAGARI)),
    "math-bold": lambda n: url(digits(n, BOLD)),
    "ascii-then-arabic": lambda n: str(n)[:-1] + url(digits(int(str(n)[-1]), ARABIC)),
    "leading-zero": lambda n: f"0{n}",
    "plus": lambda n: f"+{n}",
    "plus-encoded": lambda n: f"%2B{n}",
    "minus": lambda n: f"-{n}",
    "invalid-utf8-byte": lambda n: f"{n}%FF",  # bottle drops the byte: it reads n
    "latin1-superscript": lambda n: f"{n}%B9",  # one byte ¹, not UTF-8: dropped too
    "overlong-utf8": lambda n: f"%C0%B{str(n)[0]}{str(n)[1:]}",
    "space": lambda n: f"%20{n}",
    "newline": lambda n: f"{n}%0A",
    "double-encoded": lambda n: url(digits(n, ARABIC)).replace("%", "%25"),
    "too-big": lambda n: str(TOO_BIG),
    "twenty-digits": lambda n: str(10**19 + n),
}
OK_SPELLINGS: dict[str, Callable[[int], str]] = {
    "plain": str,
    "percent-ascii-digits": lambda n: "".join(f"%3{d}" for d in str(n)),
}

NOTE_BODY = {"version": 1, "body": "diverges, PRUNE"}
TELL_BODY = {"state": "Fail"}
STUDY_NOTE_BODY = {"version": 1, "body": "a study note"}

CASES: dict[str, Case] = {}
for name, spell in SPELLINGS.items():
    CASES[f"note-trial-{name}"] = Case("PUT", note(s, spelled(spell)), 404, "refused", NOTE_BODY)
    CASES[f"note-study-{name}"] = Case(
        "PUT", note(spelled(spell, "study"), tid), 404, "refused", NOTE_BODY
    )
    CASES[f"tell-{name}"] = Case("POST", tell(spelled(spell)), 404, "refused", TELL_BODY)
    CASES[f"study-note-{name}"] = Case(
        "PUT", study_note(spelled(spell, "study")), 404, "refused", STUDY_NOTE_BODY
    )
    CASES[f"hitl-trial-{name}"] = Case(
        "GET", lambda t, o, f=spell: f"/hitl/api/studies/{t.study_id}/{f(t.trial_id)}", 404,
        "refused",
    )
    CASES[f"hitl-undo-{name}"] = Case(
        "POST", lambda t, o, f=spell: f"/hitl/api/actions/{f(t.action_id)}/undo", 404, "refused",
        {},
    )
for name, spell in OK_SPELLINGS.items():
    CASES[f"note-{name}"] = Case("PUT", note(s, spelled(spell)), 204, "applied", NOTE_BODY)
    CASES[f"tell-{name}"] = Case("POST", tell(spelled(spell)), 204, "applied", TELL_BODY)
    CASES[f"study-note-{name}"] = Case(
        "PUT", study_note(spelled(spell, "study")), 204, "passed", STUDY_NOTE_BODY
    )
    CASES[f"hitl-trial-{name}"] = Case(
        "GET", lambda t, o, f=spell: f"/hitl/api/studies/{t.study_id}/{f(t.trial_id)}", 200,
        "checked",
    )
    CASES[f"hitl-undo-{name}"] = Case(
        "POST", lambda t, o, f=spell: f"/hitl/api/actions/{f(t.action_id)}/undo", 200, "applied",
        {},
    )
CASES.update({
    # Slashes: trailing ones the dashboard strips; %2F is a slash once gunicorn decoded it.
    "note-trailing-slash": Case("PUT", note(s, tid, "/note/"), 204, "applied", NOTE_BODY),
    "note-trailing-slashes": Case("PUT", note(s, tid, "/note///"), 204, "applied", NOTE_BODY),
    "note-encoded-slash": Case(
        "PUT", lambda t, o: f"/api/studies/{t.study_id}%2F{t.trial_id}/note", 204, "applied",
        NOTE_BODY,
    ),
    "tell-trailing-slash": Case("POST", tell(tid, "/tell/"), 204, "applied", TELL_BODY),
    "study-note-trailing-slash": Case(
        "PUT", study_note(s, "/note/"), 204, "passed", STUDY_NOTE_BODY
    ),
    "note-doubled-slash": Case(
        "PUT", lambda t, o: f"/api/studies/{t.study_id}//{t.trial_id}/note", 404, "refused",
        NOTE_BODY,
    ),
    "note-leading-slashes": Case(
        "PUT", lambda t, o: f"//api/studies/{t.study_id}/{t.trial_id}/note", 404, "refused",
        NOTE_BODY,
    ),
    "tell-doubled-slash": Case(
        "POST", lambda t, o: f"/api/trials//{t.trial_id}/tell", 404, "refused", TELL_BODY
    ),
    "hitl-trial-doubled-slash": Case(
        "GET", lambda t, o: f"/hitl/api/studies/{t.study_id}//{t.trial_id}", 404, "refused"
    ),
    # Case: bottle's paths are case-sensitive, its methods are not.
    "note-upper-case-path": Case(
        "PUT", lambda t, o: f"/API/studies/{t.study_id}/{t.trial_id}/note", 404, "refused",
        NOTE_BODY,
    ),
    "note-mixed-case-word": Case("PUT", note(s, tid, "/Note"), 404, "refused", NOTE_BODY),
    "tell-mixed-case-word": Case("POST", tell(tid, "/TELL"), 404, "refused", TELL_BODY),
    "note-lower-case-method": Case("put", note(s, tid), 404, "refused", NOTE_BODY),
    "tell-lower-case-method": Case("post", tell(tid), 404, "refused", TELL_BODY),
    "hitl-undo-lower-case-method": Case(
        "post", lambda t, o: f"/hitl/api/actions/{t.action_id}/undo", 405, "refused", {}
    ),
    # Plain spellings still meet every check: another study's trial, an id past the database.
    "note-other-study": Case(
        "PUT", lambda t, o: f"/api/studies/{o}/{t.trial_id}/note", 404, "checked", NOTE_BODY
    ),
    "note-largest-id": Case("PUT", note(s, lambda t, o: str(TOO_BIG - 1)), 404, "checked",
                            NOTE_BODY),
    "tell-largest-id": Case("POST", tell(lambda t, o: str(TOO_BIG - 1)), 404, "checked",
                            TELL_BODY),
    "hitl-trial-largest-id": Case(
        "GET", lambda t, o: f"/hitl/api/studies/{t.study_id}/{TOO_BIG - 1}", 404, "checked"
    ),
    "note-megabyte-plain": Case(
        "PUT", note(s, tid), 413, "checked", {"version": 1, "body": "PRUNE" + "x" * 1_000_000}
    ),
    "note-megabyte-fullwidth": Case(
        "PUT", note(s, spelled(SPELLINGS["fullwidth"])), 404, "refused",
        {"version": 1, "body": "PRUNE" + "x" * 1_000_000},
    ),
    "note-negative-nonexistent-trial": Case(
        "PUT", note(s, lambda t, o: "-2"), 404, "refused", NOTE_BODY
    ),
    # Other state-changing routes of the dashboard: refused in any other spelling too.
    "delete-study-fullwidth": Case(
        "DELETE", lambda t, o: f"/api/studies/{url(digits(o, FULLWIDTH))}", 404, "refused"
    ),
    "rename-study-leading-zero": Case(
        "POST", lambda t, o: f"/api/studies/0{o}/rename", 404, "refused", {"study_name": "x"}
    ),
    "user-attrs-arabic": Case(
        "POST", lambda t, o: f"/api/trials/{url(digits(t.trial_id, ARABIC))}/user-attrs", 404,
        "refused", {"user_attrs": {"a": 1}},
    ),
    "create-study-upper-case": Case("POST", lambda t, o: "/API/studies", 404, "refused",
                                    {"study_name": "x", "directions": ["minimize"]}),
    "unknown-post": Case("POST", lambda t, o: "/api/whatever", 404, "refused", {}),
})


@pytest.mark.parametrize("case", [pytest.param(c, id=k) for k, c in CASES.items()])
def test_a_route_in_any_other_spelling_is_refused_and_changes_nothing(
    world: World, target: Target, case: Case
) -> None:
    """Regression (issue 8.1): Unicode digits, signs, stray bytes ... went past every check."""
    path = as_gunicorn(case.path(target, world.other_study_id))
    before, audited = snapshot(world.storage.engine), len(audit(world.storage.engine))
    r = call(world.app, case.method, path, case.body)
    assert r.status == case.status, (path, r.body[:300])
    if r.status >= 400:
        assert isinstance(r.json()["reason"], str) and r.json()["reason"], r.body
    if case.expect in ("refused", "checked"):
        assert snapshot(world.storage.engine) == before, path
        return
    assert snapshot(world.storage.engine) != before
    trial = world.storage.get_trial(target.trial_id)
    if case.expect == "passed":  # the study's note: saved by the dashboard, no trial touched
        assert trial.state is TrialState.RUNNING and "X-Hitl-Outcome" not in r.headers
        assert len(audit(world.storage.engine)) == audited
        return
    assert case.expect == "applied"
    assert r.outcome is not None and r.outcome["action"] == "applied", r.headers
    rows = audit(world.storage.engine)
    assert len(rows) == audited + 1
    if "/undo" in path:
        assert rows[-1].is_undo
    else:
        assert trial.state in (TrialState.PRUNED, TrialState.FAIL)
        assert rows[-1].trial_id == target.trial_id


# -- the rule itself -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path_info", "seen"),
    [
        pytest.param("/api/trials/\xef\xbc\x95/tell", "/api/trials/\uff15/tell", id="fullwidth"),
        pytest.param("/api/trials/5\xff/tell//", "/api/trials/5/tell", id="dropped-byte"),
        pytest.param("/", "/", id="root"),
        pytest.param("///", "/", id="slashes"),
        pytest.param("/api/\u0663", None, id="not-a-wsgi-string"),
    ],
)
def test_dashboard_path_reads_a_path_as_bottle_does(path_info: str, seen: str | None) -> None:
    assert routes.dashboard_path(path_info) == seen


def test_every_state_changing_route_of_the_dashboard_is_known() -> None:
    """An upgrade that adds a POST/PUT/DELETE route fails here: it would be refused until listed."""
    app = dashboard.create(RDBStorage("sqlite:///:memory:"), None)
    rules = {(r.method, r.rule) for r in app.routes if r.method not in ("GET", "HEAD")}
    assert len(rules) == len(routes.MUTATING) + 2  # the three LLM routes share one entry
    for method, rule in rules:
        plain = (
            rule.replace("<study_id:int>", "1").replace("<trial_id:int>", "2")
            .replace("<history_id>", "ab-12").replace("<artifact_id:re:[0-9a-fA-F-]+>", "ab-12")
        )
        assert routes.mutating_route(method, plain) is not None, (method, rule)


# -- a body the dashboard would read otherwise than we do ------------------------------------


def test_a_tell_larger_than_we_read_is_refused_not_passed_on(sqlite_url: str) -> None:
    """Regression: a padded {"state": "Fail"} over 64 KiB went to the dashboard unaudited."""
    study = optuna.create_study(storage=RDBStorage(sqlite_url))
    trial_id = study.ask()._trial_id
    app = app_for(sqlite_url)
    r = call(app, "POST", f"/api/trials/{trial_id}/tell", {"state": "Fail", "pad": "x" * 70_000})
    assert r.status == 413 and "64 KiB" in r.json()["reason"]
    assert RDBStorage(sqlite_url).get_trial(trial_id).state is TrialState.RUNNING


# -- through a real gunicorn ---------------------------------------------------------------


def raw_http(port: int, request: bytes) -> tuple[int, bytes]:
    """Send bytes as they are (no client library re-encodes the path); return status, body."""
    with socket.create_connection((HOST, port), timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def request_bytes(method: str, path: str, body: bytes, *, chunked: bool = False) -> bytes:
    headers = f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n"
    headers += "Content-Type: application/json\r\n"
    if chunked:
        framed = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
        return (headers + "Transfer-Encoding: chunked\r\n\r\n").encode() + framed
    return (headers + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def test_gunicorn_hands_over_the_paths_the_table_assumes(sqlite_url: str, tmp_path: Path) -> None:
    """The same spellings through a real server: refused unread, or taken with our checks."""
    study = optuna.create_study(storage=RDBStorage(sqlite_url))
    ids = [study.ask()._trial_id for _ in range(3)]
    sid = study._study_id
    engine = RDBStorage(sqlite_url).engine
    with gunicorn_server(sqlite_url, tmp_path, interval=3600) as server:
        note_body = b'{"version": 1, "body": "PRUNE"}'
        before = snapshot(engine)
        for path, body in [
            (f"/api/studies/{sid}/{url(digits(ids[0], ARABIC))}/note", note_body),
            (f"/api/trials/{url(digits(ids[0], FULLWIDTH))}/tell", b'{"state": "Fail"}'),
            (f"/api/studies/{sid}/{ids[0]}%FF/note", note_body),
            (f"/api/studies/{sid}/-{ids[0]}/note", note_body),
        ]:
            status, answer = raw_http(server.port, request_bytes(
                "POST" if "tell" in path else "PUT", path, body
            ))
            assert status == 404 and b'"reason"' in answer, (path, answer)
        # A chunked body whose content is itself chunk-framed: bottle would undo the framing a
        # second time and read {"state": "Fail"}, which we never saw.
        inner = request_bytes("POST", "/", b'{"state": "Fail"}', chunked=True).split(
            b"\r\n\r\n", 1
        )[1]
        status, answer = raw_http(server.port, request_bytes(
            "POST", f"/api/trials/{ids[1]}/tell", inner, chunked=True
        ))
        assert status == 400, answer
        assert snapshot(engine) == before
        # %2F decodes to a slash and %3N to a digit: the plain route, with our checks.
        digit_path = "".join(f"%3{d}" for d in str(ids[2]))
        status, answer = raw_http(server.port, request_bytes(
            "POST", f"/api/trials{'%2F'}{digit_path}/tell", b'{"state": "Fail"}', chunked=True
        ))
        assert status == 204, answer
    rows = audit(engine)
    assert [(r.trial_id, r.to_state, r.source) for r in rows] == [(ids[2], "FAIL", "fail-button")]
    assert RDBStorage(sqlite_url).get_trial(ids[0]).state is TrialState.RUNNING
    assert RDBStorage(sqlite_url).get_trial(ids[1]).state is TrialState.RUNNING
