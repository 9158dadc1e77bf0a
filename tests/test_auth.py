"""Who may act: basic auth, a trusted proxy's user header, and the allow-list of commanders."""

from __future__ import annotations

import base64
import io
import sys
from typing import Any
from typing import Iterable

from helpers import app_for
from helpers import call
from helpers import make_study
from helpers import save
from helpers import state
import optuna
from optuna.storages import JournalStorage
from optuna.storages import RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from optuna_dashboard import save_note
from optuna_dashboard._note import get_note_from_system_attrs
from processes import serve_server
import pytest
import sqlalchemy as sa

from hitl_pruner import auth
from hitl_pruner.auth import AuthMiddleware
from hitl_pruner.cli import main
from hitl_pruner.config import ConfigError
from hitl_pruner.config import resolve

ALICE_HASH = auth.hash_password("wonderland")
BOB_HASH = auth.hash_password("builder")
PROXY = {"REMOTE_ADDR": "127.0.0.1"}


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"HTTP_AUTHORIZATION": f"Basic {token}"}


def echo(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    """Answers the REMOTE_USER it got, and whether the user header reached it."""
    start_response("200 OK", [("Content-Type", "text/plain")])
    leaked = "HTTP_X_REMOTE_USER" in environ
    return [f"{environ.get('REMOTE_USER', '-')} leaked={leaked}".encode()]


def audit_users(url: str) -> list[tuple[int, str | None]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT trial_id, user_name FROM hitl_audit ORDER BY id"))
            return [(r.trial_id, r.user_name) for r in rows]
    finally:
        engine.dispose()


# -- password hashes -------------------------------------------------------------------------


def test_a_hash_verifies_its_password_only() -> None:
    assert ALICE_HASH.startswith("scrypt$") and "wonderland" not in ALICE_HASH
    assert auth.verify_password("wonderland", ALICE_HASH)
    assert not auth.verify_password("Wonderland", ALICE_HASH)
    assert auth.hash_password("wonderland") != ALICE_HASH  # salted


@pytest.mark.parametrize("stored", ["", "plain", "md5$1$2$3$4$5", "scrypt$3$8$1$AAAA$AAAA",
                                    "scrypt$16384$8$1$!!$AAAA"])
def test_a_damaged_hash_is_refused(stored: str) -> None:
    with pytest.raises(auth.HashError):
        auth.check_hash(stored)


def test_hash_password_command_prints_a_credentials_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("s3cret\n"))
    assert main(["hash-password", "carol"]) == 0
    line = capsys.readouterr().out.strip()
    [(user, stored)] = auth.parse_credentials([line], "output")
    assert user == "carol" and auth.verify_password("s3cret", stored)


def test_hash_password_command_refuses_a_bad_user_name(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("s3cret\n"))
    assert main(["hash-password", "a:b"]) == 2
    assert "cannot be a user name" in capsys.readouterr().err


# -- AuthMiddleware --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "environ, expected",
    [
        pytest.param({}, None, id="no-credentials"),
        pytest.param(basic("alice", "nope"), None, id="wrong-password"),
        pytest.param(basic("mallory", "wonderland"), None, id="unknown-user"),
        pytest.param({"HTTP_AUTHORIZATION": "Bearer abc"}, None, id="other-scheme"),
        pytest.param({"HTTP_AUTHORIZATION": "Basic !!!"}, None, id="not-base64"),
        pytest.param(basic("alice", "wonderland"), "alice", id="alice"),
        pytest.param({**basic("bob", "builder"), "REMOTE_USER": "alice"}, "bob",
                     id="replaces-remote-user"),
    ],
)
def test_basic_auth(environ: dict[str, str], expected: str | None) -> None:
    app = AuthMiddleware(echo, users={"alice": ALICE_HASH, "bob": BOB_HASH})
    for _ in range(2):  # the second time from the cache of verified headers
        r = call(app, "GET", "/dashboard", environ=environ)
        if expected is None:
            assert r.status == 401
            assert r.headers["WWW-Authenticate"].startswith('Basic realm="hitl-pruner"')
            assert "log in" in r.json()["reason"]
        else:
            assert r.status == 200 and r.body.decode().startswith(f"{expected} ")


@pytest.mark.parametrize(
    "trusted, environ, expected",
    [
        pytest.param(("127.0.0.1",), {**PROXY, "HTTP_X_REMOTE_USER": "alice"}, "alice",
                     id="from-the-proxy"),
        pytest.param(("127.0.0.1",), {"REMOTE_ADDR": "10.1.2.3", "HTTP_X_REMOTE_USER": "alice"},
                     "-", id="from-elsewhere-dropped"),
        pytest.param(("127.0.0.1",), {"HTTP_X_REMOTE_USER": "alice"}, "-",
                     id="no-address-dropped"),
        pytest.param(("10.0.0.0/8",), {"REMOTE_ADDR": "10.1.2.3", "HTTP_X_REMOTE_USER": "bob"},
                     "bob", id="network"),
        pytest.param(("*",), {"REMOTE_ADDR": "192.0.2.9", "HTTP_X_REMOTE_USER": "bob"}, "bob",
                     id="star"),
        pytest.param(("127.0.0.1",), {**PROXY, "HTTP_X_REMOTE_USER": "  "}, "-", id="blank"),
        pytest.param(("127.0.0.1",),
                     {**PROXY, "REMOTE_USER": "server", "HTTP_X_REMOTE_USER": "alice"},
                     "server", id="server-remote-user-wins"),
        pytest.param(("127.0.0.1",), {"REMOTE_ADDR": "10.1.2.3", "REMOTE_USER": "server"},
                     "server", id="server-remote-user-kept"),
    ],
)
def test_user_header(trusted: tuple[str, ...], environ: dict[str, str], expected: str) -> None:
    app = AuthMiddleware(echo, user_header="X-Remote-User", trusted=trusted)
    r = call(app, "GET", "/api/meta", environ=environ)
    assert r.status == 200
    # The header never reaches the application, trusted or not.
    assert r.body.decode() == f"{expected} leaked=False"


def test_without_a_user_header_setting_the_header_names_nobody() -> None:
    app = AuthMiddleware(echo, users={"alice": ALICE_HASH})
    r = call(app, "GET", "/", environ={**PROXY, **basic("alice", "wonderland"),
                                       "HTTP_X_REMOTE_USER": "bob"})
    assert r.body.decode().startswith("alice ")


# -- settings --------------------------------------------------------------------------------


def test_settings_from_file_environment_and_flags(tmp_path: Any) -> None:
    creds = tmp_path / "users"
    creds.write_text(f"# team\nalice:{ALICE_HASH}\n\nbob:{BOB_HASH}\n")
    s = resolve({"basic_auth_file": str(creds), "allowed_users": "alice"}, {})
    assert dict(s.basic_auth) == {"alice": ALICE_HASH, "bob": BOB_HASH}
    assert s.allowed_users == ("alice",)
    assert ALICE_HASH not in repr(s)
    s = resolve({}, {"HITL_BASIC_AUTH": f"alice:{ALICE_HASH},bob:{BOB_HASH}",
                     "HITL_ALLOWED_USERS": "alice, bob"})
    assert [u for u, _ in s.basic_auth] == ["alice", "bob"]
    assert s.allowed_users == ("alice", "bob")
    s = resolve({}, {"HITL_USER_HEADER": "X-Forwarded-User",
                     "HITL_FORWARDED_ALLOW_IPS": "10.0.0.1, 192.168.0.0/16"})
    assert s.user_header == "X-Forwarded-User"
    assert s.forwarded_allow_ips == ("10.0.0.1", "192.168.0.0/16")
    s = resolve({}, {})
    assert (s.basic_auth, s.user_header, s.forwarded_allow_ips, s.allowed_users) == (
        (), None, ("127.0.0.1",), None
    )


@pytest.mark.parametrize(
    "cli, env, message",
    [
        pytest.param({"basic_auth_file": "/no/such/file"}, {}, "cannot read --basic-auth-file",
                     id="missing-file"),
        pytest.param({}, {"HITL_BASIC_AUTH": "alice:secret"}, "hash-password",
                     id="plain-password"),
        pytest.param({}, {"HITL_BASIC_AUTH": "alice"}, "expected user:hash", id="no-hash"),
        pytest.param({"user_header": "X Remote"}, {}, "is not a header name", id="bad-header"),
        pytest.param({"user_header": "X-User"}, {"HITL_BASIC_AUTH": f"alice:{ALICE_HASH}"},
                     "exclude each other", id="header-and-basic"),
        pytest.param({"forwarded_allow_ips": "10.0.0.300"}, {}, "--forwarded-allow-ips",
                     id="bad-address"),
    ],
)
def test_bad_settings_say_how_to_fix_them(
    cli: dict[str, str], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("*", r"\*")):
        resolve(cli, env)


# -- the allow-list, through the whole app ---------------------------------------------------


def allow_app(url: str, **settings: Any) -> Any:
    return app_for(url, allowed_users=("alice",), user_header="X-Remote-User", **settings)


def as_user(user: str) -> dict[str, str]:
    return {**PROXY, "HTTP_X_REMOTE_USER": user}


def test_a_user_off_the_list_saves_the_note_but_not_the_command(storage_url: str) -> None:
    study, ids = make_study(storage_url)
    app = allow_app(storage_url)
    r = save(app, study._study_id, ids["running"], 1, "PRUNE", environ=as_user("bob"))
    assert r.status == 204
    assert r.outcome == {
        "action": "refused", "reason": "user 'bob' may not issue commands (--allowed-users)",
        "trial_id": ids["running"], "from": None, "to": None,
    }
    assert state(storage_url, ids["running"]) is TrialState.RUNNING
    attrs = RDBStorage(storage_url).get_study_system_attrs(study._study_id)
    assert dict(get_note_from_system_attrs(attrs, ids["running"])) == {
        "version": 1, "body": "PRUNE"
    }
    # Regression: the sweep must not apply later what the allow-list refused.
    app.sweeper.run_once()
    assert state(storage_url, ids["running"]) is TrialState.RUNNING
    # Someone on the list saves the same words: applied, and audited under their name.
    r = save(app, study._study_id, ids["running"], 2, "PRUNE", environ=as_user("alice"))
    assert r.outcome["action"] == "applied"
    assert state(storage_url, ids["running"]) is TrialState.PRUNED
    assert audit_users(storage_url) == [(ids["running"], "alice")]


def test_a_note_without_a_command_from_anyone_is_just_saved(sqlite_url: str) -> None:
    study, ids = make_study(sqlite_url)
    r = save(allow_app(sqlite_url), study._study_id, ids["running"], 1, "looks fine",
             environ=as_user("bob"))
    assert r.status == 204 and r.outcome["action"] == "nothing to do"


def test_a_forged_header_from_an_untrusted_client_names_nobody(sqlite_url: str) -> None:
    study, ids = make_study(sqlite_url)
    app = allow_app(sqlite_url)
    r = save(app, study._study_id, ids["running"], 1, "PRUNE",
             environ={"REMOTE_ADDR": "10.9.9.9", "HTTP_X_REMOTE_USER": "alice"})
    assert r.outcome["action"] == "refused"
    assert "no user name came with the request" in r.outcome["reason"]
    app.sweeper.run_once()
    assert state(sqlite_url, ids["running"]) is TrialState.RUNNING


def test_the_fail_button_is_refused_too(sqlite_url: str) -> None:
    study, ids = make_study(sqlite_url)
    app = allow_app(sqlite_url)
    path = f"/api/trials/{ids['running']}/tell"
    r = call(app, "POST", path, {"state": "Fail"}, environ=as_user("bob"))
    assert r.status == 204 and r.outcome["action"] == "refused"
    assert "'bob' may not issue commands" in r.outcome["reason"]
    assert state(sqlite_url, ids["running"]) is TrialState.RUNNING
    r = call(app, "POST", path, {"state": "Fail"}, environ=as_user("alice"))
    assert r.outcome["action"] == "applied"
    assert state(sqlite_url, ids["running"]) is TrialState.FAIL


def test_undo_by_a_user_off_the_list_is_refused(sqlite_url: str) -> None:
    """Taking PRUNE out of a note would put the trial back: a change, so refused too."""
    study, ids = make_study(sqlite_url)
    app = allow_app(sqlite_url)
    save(app, study._study_id, ids["complete"], 1, "PRUNE", environ=as_user("alice"))
    assert state(sqlite_url, ids["complete"]) is TrialState.PRUNED
    r = save(app, study._study_id, ids["complete"], 2, "fine after all", environ=as_user("bob"))
    assert r.outcome["action"] == "refused"
    app.sweeper.run_once()
    assert state(sqlite_url, ids["complete"]) is TrialState.PRUNED


def test_the_sweep_still_applies_notes_scripts_write(sqlite_url: str) -> None:
    """With an allow-list, a note written straight to the storage (no user) is still applied."""
    study, ids = make_study(sqlite_url)
    app = allow_app(sqlite_url)
    save(app, study._study_id, ids["running"], 1, "PRUNE", environ=as_user("bob"))
    # A script appends to the refused note: a new version, nobody refused it.
    save_note(optuna.Trial(study, ids["running"]), "PRUNE (from the script)")
    app.sweeper.run_once()
    assert state(sqlite_url, ids["running"]) is TrialState.PRUNED
    assert audit_users(sqlite_url) == [(ids["running"], None)]


def test_basic_auth_guards_every_route_and_names_the_user(sqlite_url: str) -> None:
    study, ids = make_study(sqlite_url)
    app = app_for(sqlite_url, basic_auth=(("alice", ALICE_HASH),))
    for path in ("/dashboard", "/api/meta", "/hitl/actions", "/hitl/api/actions",
                 "/hitl/static/hitl.js"):
        assert call(app, "GET", path).status == 401, path
    assert callable(app.start_background) and app.sweeper is not None
    r = save(app, study._study_id, ids["running"], 1, "PRUNE",
             environ=basic("alice", "wonderland"))
    assert r.outcome["action"] == "applied"
    assert audit_users(sqlite_url) == [(ids["running"], "alice")]
    assert call(app, "GET", "/api/meta", environ=basic("alice", "wonderland")).status == 200


def test_health_probes_need_no_login_under_basic_auth(sqlite_url: str) -> None:
    """Orchestrators probe /healthz without credentials; nothing else is let through."""
    app = app_for(sqlite_url, basic_auth=(("alice", ALICE_HASH),))
    assert call(app, "GET", "/healthz").status in (200, 503)  # no sweep thread runs here
    assert call(app, "POST", "/healthz").status == 401
    assert call(app, "GET", "/healthz/x").status == 401


def test_only_notes_that_could_change_a_trial_are_remembered_as_refused(sqlite_url: str) -> None:
    study, ids = make_study(sqlite_url)
    app = allow_app(sqlite_url)

    def refused_keys() -> list[str]:
        attrs = RDBStorage(sqlite_url).get_study_system_attrs(study._study_id)
        return sorted(k for k in attrs if k.startswith("hitl:refused:"))

    save(app, study._study_id, ids["running"], 1, "looks fine", environ=as_user("bob"))
    assert refused_keys() == []
    save(app, study._study_id, ids["running"], 2, "PRUNE", environ=as_user("bob"))
    [key] = refused_keys()
    assert key.startswith(f"hitl:refused:{ids['running']}:2:")
    assert RDBStorage(sqlite_url).get_study_system_attrs(study._study_id)[key] == "bob"


@pytest.mark.e2e
def test_a_real_server_takes_the_user_from_a_trusted_proxy_only(
    sqlite_url: str, tmp_path: Any
) -> None:
    """serve --user-header --forwarded-allow-ips --allowed-users: the flags reach the app."""
    study, ids = make_study(sqlite_url)
    note = f"/api/studies/{study._study_id}/{ids['running']}/note"
    header = {"X-Remote-User": "alice"}
    # The test client is at 127.0.0.1: first not a trusted proxy, then one.
    args = ["--user-header", "X-Remote-User", "--allowed-users", "alice",
            "--forwarded-allow-ips", "10.0.0.1"]
    with serve_server(sqlite_url, tmp_path, args=args, interval=300) as server:
        reply = server.request("PUT", note, json={"version": 1, "body": "PRUNE"},
                               headers=header)
        assert reply.status == 204 and reply.outcome["action"] == "refused", reply
        assert "no user name" in reply.outcome["reason"]
    args[-1] = "127.0.0.1"
    with serve_server(sqlite_url, tmp_path, args=args, interval=300) as server:
        reply = server.request("PUT", note, json={"version": 2, "body": "PRUNE"},
                               headers=header)
        assert reply.status == 204 and reply.outcome["action"] == "applied", reply
    assert audit_users(sqlite_url) == [(ids["running"], "alice")]


def test_a_refused_note_on_a_journal_is_not_applied_by_a_later_server(tmp_path: Any) -> None:
    """A journal's sweep reads every note again after a restart: the refusal must persist."""
    url = str(tmp_path / "journal.log")
    study = optuna.create_study(storage=JournalStorage(JournalFileBackend(url)))
    running = study.ask()._trial_id
    r = save(allow_app(url), study._study_id, running, 1, "PRUNE", environ=as_user("bob"))
    assert r.outcome["action"] == "refused"
    later = allow_app(url)
    later.sweeper.run_once()
    storage = JournalStorage(JournalFileBackend(url))
    assert storage.get_trial(running).state is TrialState.RUNNING
