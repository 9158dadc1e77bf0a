"""Cross-origin protection and framing, in process: the served composition on SQLite.

Every case goes through ``behind_proxy(create_app(...))``, the layers every entry point serves,
and checks the answer; a refused case also checks that nothing in the database or the artifact
store changed (studies, trials, notes, attrs, audit rows, artifact files).
"""

from __future__ import annotations

import base64
from pathlib import Path
import shutil
from typing import Any
from typing import NamedTuple

from helpers import audit_rows
from helpers import call
from helpers import make_study
from helpers import save
from helpers import state
from optuna.storages import RDBStorage
from optuna.trial import TrialState
import pytest

from hitl_pruner import Settings
from hitl_pruner import create_app
from hitl_pruner.auth import hash_password
from hitl_pruner.config import ConfigError
from hitl_pruner.config import resolve
from hitl_pruner.origin import CrossOriginGuard
from hitl_pruner.prefix import behind_proxy

HOST = "hitl.example:8080"
PROXY = "127.0.0.1"  # in the default --forwarded-allow-ips
# The names the tests' server is reached under (--allowed-hosts); IP addresses always count.
ALLOWED_HOSTS = ("hitl.example", "optuna.example.org")


class Fixture(NamedTuple):
    app: Any
    url: str
    artifacts: Path
    study_id: int
    ids: dict[str, int]
    undo_id: int


class Seeded(NamedTuple):
    path: Path
    study_id: int
    ids: dict[str, int]
    undo_id: int


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Seeded:
    """A study with trials in every state and one undoable relabel, in a SQLite file made once
    (most of a test's time, ~150 times over): each test gets a copy of its own."""
    path = tmp_path_factory.mktemp("origin") / "seeded.db"
    url = f"sqlite:///{path}"
    study, ids = make_study(url)
    settings = Settings(storage_url=url, allowed_hosts=ALLOWED_HOSTS)
    app = create_app(settings, autostart=False)
    # PRUNE, not FAIL: the dashboard cannot rename a study with a FAILed trial that has values.
    relabel = save(app, study._study_id, ids["complete"], 1, "PRUNE")
    assert relabel.outcome is not None and relabel.outcome["action"] == "applied", relabel.body
    [row] = audit_rows(url)
    return Seeded(path, study._study_id, ids, row.id)


@pytest.fixture
def served(seeded: Seeded, tmp_path: Path) -> Fixture:
    """The app as served, on its own copy of the seeded database."""
    path = tmp_path / "optuna.db"
    shutil.copyfile(seeded.path, path)
    url = f"sqlite:///{path}"
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    settings = Settings(storage_url=url, artifact_dir=str(artifacts), allowed_hosts=ALLOWED_HOSTS)
    app = behind_proxy(create_app(settings, autostart=False), settings)
    return Fixture(app, url, artifacts, seeded.study_id, seeded.ids, seeded.undo_id)


def snapshot(fx: Fixture) -> Any:
    """Everything a state-changing request could change."""
    storage = RDBStorage(fx.url)
    try:
        studies = storage.get_all_studies()
        return (
            [(s._study_id, s.study_name, s.user_attrs, s.system_attrs) for s in studies],
            [
                (t._trial_id, t.state, t.values, t.user_attrs, t.system_attrs)
                for s in studies
                for t in storage.get_all_trials(s._study_id, deepcopy=False)
            ],
            [tuple(row) for row in audit_rows(fx.url)],
            sorted(p.name for p in fx.artifacts.iterdir()),
        )
    finally:
        storage.engine.dispose()


def headers(**given: str) -> dict[str, str]:
    """WSGI environ keys for request headers: origin="..." -> HTTP_ORIGIN."""
    environ = {"HTTP_HOST": HOST, "REMOTE_ADDR": PROXY}
    for name, value in given.items():
        key = name.upper()
        environ[key if key in ("CONTENT_TYPE", "REMOTE_ADDR") else "HTTP_" + key] = value
    return environ


# -- who sent it: the tell route (the Fail button), a state change the attack aimed at --------

ALLOWED, FORBIDDEN, UNSUPPORTED = 204, 403, 415

SENDERS = [
    pytest.param(headers(), ALLOWED, id="neither header: not a browser"),
    pytest.param(headers(sec_fetch_site="same-origin"), ALLOWED, id="sec-fetch-site same-origin"),
    pytest.param(headers(sec_fetch_site="none"), ALLOWED, id="sec-fetch-site none (user typed)"),
    pytest.param(headers(sec_fetch_site="cross-site"), FORBIDDEN, id="sec-fetch-site cross-site"),
    pytest.param(headers(sec_fetch_site="same-site"), FORBIDDEN,
                 id="sec-fetch-site same-site (another port)"),
    pytest.param(headers(sec_fetch_site="Cross-Site"), FORBIDDEN, id="sec-fetch-site mixed case"),
    pytest.param(headers(sec_fetch_site="bogus"), FORBIDDEN, id="sec-fetch-site unknown value"),
    pytest.param(headers(sec_fetch_site="cross-site", origin=f"http://{HOST}"), FORBIDDEN,
                 id="sec-fetch-site cross-site wins over a matching origin"),
    pytest.param(headers(sec_fetch_site="same-origin", origin="http://evil.example"), ALLOWED,
                 id="sec-fetch-site same-origin wins over the origin"),
    pytest.param(headers(origin=f"http://{HOST}"), ALLOWED, id="origin matches host"),
    pytest.param(headers(origin="http://HITL.example:8080"), ALLOWED,
                 id="origin matches host in another case"),
    pytest.param(headers(origin="http://evil.example"), FORBIDDEN, id="origin another host"),
    pytest.param(headers(origin="http://hitl.example:8081"), FORBIDDEN,
                 id="origin same host another port"),
    pytest.param(headers(origin="http://hitl.example"), FORBIDDEN,
                 id="origin same host without the port"),
    pytest.param(headers(origin="http://hitl.example.evil.example:8080"), FORBIDDEN,
                 id="origin a host that starts like ours"),
    pytest.param(headers(origin="null"), FORBIDDEN, id="origin null (sandboxed frame)"),
    pytest.param(headers(origin="http://hitl.example", host="hitl.example:80"), ALLOWED,
                 id="origin without the default port a proxy names"),
    pytest.param(headers(origin="https://hitl.example", host="hitl.example:80"), FORBIDDEN,
                 id="origin https with host on port 80"),
    pytest.param({**headers(origin=f"http://{HOST}"), "HTTP_HOST": ""}, FORBIDDEN,
                 id="origin without any host header"),
    pytest.param(headers(origin="https://optuna.example.org", host="127.0.0.1:8000",
                         x_forwarded_host="optuna.example.org"), ALLOWED,
                 id="origin matches x-forwarded-host from a trusted proxy"),
    pytest.param(headers(origin="https://optuna.example.org", host="127.0.0.1:8000",
                         x_forwarded_host="optuna.example.org, inner.example"), ALLOWED,
                 id="origin matches the first x-forwarded-host of a chain"),
    pytest.param(headers(origin=f"http://{HOST}", x_forwarded_host="optuna.example.org"),
                 FORBIDDEN, id="origin matches host but not the trusted x-forwarded-host"),
    pytest.param(headers(origin="http://evil.example", x_forwarded_host="evil.example",
                         remote_addr="192.0.2.7"), FORBIDDEN,
                 id="x-forwarded-host from an untrusted address is ignored"),
    pytest.param(headers(origin="https://optuna.example.org", host="127.0.0.1:8000"),
                 FORBIDDEN, id="proxy that rewrote host and sent no x-forwarded-host"),
]


@pytest.mark.parametrize("environ, expected", SENDERS)
def test_who_may_fail_a_running_trial(
    served: Fixture, environ: dict[str, str], expected: int
) -> None:
    """Regression: a page of another origin could FAIL a running trial with the Fail button's
    request; only this server's own pages, the user, or non-browser clients may."""
    before = snapshot(served)
    r = call(served.app, "POST", f"/api/trials/{served.ids['running']}/tell",
             {"state": "Fail"}, environ=environ)
    assert r.status == expected, r.body
    if expected == FORBIDDEN:
        assert "cross-origin POST" in r.json()["reason"]
        assert snapshot(served) == before
    else:
        assert r.outcome is not None and r.outcome["to"] == "FAIL"


def test_a_logged_in_browser_is_refused_from_another_site_too(sqlite_url: str) -> None:
    """Regression: with basic auth, the browser sends the login along with another site's
    form post, and the audit named the logged-in user as the one who FAILed the trial."""
    study, ids = make_study(sqlite_url)
    settings = Settings(storage_url=sqlite_url, basic_auth=(("alice", hash_password("pw")),),
                        allowed_hosts=ALLOWED_HOSTS)
    app = behind_proxy(create_app(settings, autostart=False), settings)
    login = "Basic " + base64.b64encode(b"alice:pw").decode()
    tell = f"/api/trials/{ids['running']}/tell"
    cross = headers(sec_fetch_site="cross-site", authorization=login, content_type="text/plain")
    r = call(app, "POST", tell, {"state": "Fail"}, environ=cross)
    assert r.status == FORBIDDEN
    assert state(sqlite_url, ids["running"]) is TrialState.RUNNING
    assert audit_rows(sqlite_url) == []
    own = headers(sec_fetch_site="same-origin", authorization=login)
    r = call(app, "POST", tell, {"state": "Fail"}, environ=own)
    assert r.status == 204
    [row] = audit_rows(sqlite_url)
    assert (row.user_name, row.to_state) == ("alice", "FAIL")


def test_a_refusal_behind_a_proxy_says_how_to_forward_the_host(served: Fixture) -> None:
    environ = headers(origin="https://optuna.example.org", host="127.0.0.1:8000")
    r = call(served.app, "POST", f"/api/trials/{served.ids['running']}/tell", {"state": "Fail"},
             environ=environ)
    reason = r.json()["reason"]
    assert "Origin https://optuna.example.org" in reason and "(127.0.0.1:8000)" in reason
    assert "Host $http_host" in reason and "X-Forwarded-Host" in reason


# -- what it sends: JSON only ---------------------------------------------------------------

TELL_BODY = b'{"state": "Fail"}'

CONTENT_TYPES = [
    pytest.param("application/json", TELL_BODY, ALLOWED, id="json"),
    pytest.param("application/json; charset=utf-8", TELL_BODY, ALLOWED, id="json with charset"),
    pytest.param("Application/JSON", TELL_BODY, ALLOWED, id="json in another case"),
    pytest.param("text/plain", TELL_BODY, UNSUPPORTED, id="text/plain (a form or no-cors fetch)"),
    pytest.param("text/plain;charset=UTF-8", TELL_BODY, UNSUPPORTED, id="text/plain charset"),
    pytest.param("application/x-www-form-urlencoded", b"state=Fail", UNSUPPORTED,
                 id="urlencoded form"),
    pytest.param("multipart/form-data; boundary=x", TELL_BODY, UNSUPPORTED, id="multipart form"),
    pytest.param("", TELL_BODY, UNSUPPORTED, id="no content type"),
    pytest.param("application/jsonx", TELL_BODY, UNSUPPORTED, id="a type that starts like json"),
    pytest.param("application/json-patch+json", TELL_BODY, UNSUPPORTED, id="another json type"),
]


@pytest.mark.parametrize("sender", ["no browser headers", "same-origin page"])
@pytest.mark.parametrize("content_type, body, expected", CONTENT_TYPES)
def test_a_state_change_needs_a_json_body(
    served: Fixture, content_type: str, body: bytes, expected: int, sender: str
) -> None:
    """Regression: the Fail button's path read {"state": "Fail"} under any Content-Type."""
    extra = {"sec_fetch_site": "same-origin"} if sender == "same-origin page" else {}
    before = snapshot(served)
    r = call(served.app, "POST", f"/api/trials/{served.ids['running']}/tell", raw=body,
             environ=headers(content_type=content_type, **extra))
    assert r.status == expected, r.body
    if expected == UNSUPPORTED:
        assert "application/json" in r.json()["reason"]
        assert snapshot(served) == before


def test_a_chunked_body_without_a_length_needs_json_too(served: Fixture) -> None:
    before = snapshot(served)
    environ = {**headers(content_type="text/plain", transfer_encoding="chunked"),
               "CONTENT_LENGTH": ""}
    r = call(served.app, "POST", f"/api/trials/{served.ids['running']}/tell", raw=TELL_BODY,
             environ=environ)
    assert r.status == UNSUPPORTED
    assert snapshot(served) == before


# -- every state-changing route, the dashboard's and ours ---------------------------------------


def data_uri(text: str) -> str:
    return "data:text/plain;base64," + base64.b64encode(text.encode()).decode()


ROUTES: dict[str, Any] = {
    # id: (method, path template, JSON body, status when it passes)
    "tell (Fail button)": ("POST", "/api/trials/{running}/tell", {"state": "Fail"}, 204),
    "trial note": ("PUT", "/api/studies/{sid}/{running}/note", {"version": 1, "body": "PRUNE"},
                   204),
    "undo": ("POST", "/hitl/api/actions/{undo}/undo", {}, 200),
    "study note": ("PUT", "/api/studies/{sid}/note", {"version": 1, "body": "hi"}, 204),
    "study create": ("POST", "/api/studies", {"study_name": "new", "directions": ["minimize"]},
                     201),
    "study rename": ("POST", "/api/studies/{sid}/rename", {"study_name": "renamed"}, 201),
    "study delete": ("DELETE", "/api/studies/{sid}", {"remove_associated_artifacts": False}, 204),
    "user attrs": ("POST", "/api/trials/{running}/user-attrs", {"user_attrs": {"k": "v"}}, 204),
    "trial artifact": ("POST", "/api/artifacts/{sid}/{running}",
                       {"file": data_uri("x"), "filename": "x.txt"}, 201),
    "study artifact": ("POST", "/api/artifacts/{sid}", {"file": data_uri("x"),
                                                        "filename": "x.txt"}, 201),
}

ATTACKS = [
    pytest.param(headers(sec_fetch_site="cross-site", origin="http://evil.example"), "json",
                 FORBIDDEN, id="cross-site"),
    pytest.param(headers(sec_fetch_site="same-site", origin="http://hitl.example:9999"), "json",
                 FORBIDDEN, id="same-site other port"),
    pytest.param(headers(origin="http://evil.example"), "json", FORBIDDEN,
                 id="mismatched origin, no sec-fetch-site"),
    pytest.param(headers(sec_fetch_site="same-origin"), "text/plain", UNSUPPORTED,
                 id="same-origin text/plain"),
    pytest.param(headers(), "text/plain", UNSUPPORTED, id="no browser headers text/plain"),
    pytest.param(headers(sec_fetch_site="same-origin", origin=f"http://{HOST}"), "json", None,
                 id="the dashboard's own page"),
]


@pytest.mark.parametrize("environ, kind, expected", ATTACKS)
@pytest.mark.parametrize("route", list(ROUTES))
def test_every_state_changing_route_is_guarded(
    served: Fixture, route: str, environ: dict[str, str], kind: str, expected: int | None
) -> None:
    """Refused requests change nothing; the dashboard's own page still gets through."""
    method, template, body, passes = ROUTES[route]
    path = template.format(sid=served.study_id, running=served.ids["running"],
                           undo=served.undo_id)
    if kind == "text/plain":
        environ = {**environ, "CONTENT_TYPE": "text/plain"}
    before = snapshot(served)
    r = call(served.app, method, path, body, environ=environ)
    if expected is None:
        assert r.status == passes, r.body
        assert snapshot(served) != before
        return
    assert r.status == expected, r.body
    assert r.headers["Content-Type"] == "application/json" and r.json()["reason"]
    assert snapshot(served) == before


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS"])
def test_safe_methods_pass_from_anywhere(served: Fixture, method: str) -> None:
    environ = headers(sec_fetch_site="cross-site", origin="http://evil.example",
                      content_type="text/plain")
    r = call(served.app, method, f"/api/studies/{served.study_id}", environ=environ)
    assert r.status not in (FORBIDDEN, UNSUPPORTED)


@pytest.mark.parametrize("method", ["PATCH", "post", "PROPFIND"])
def test_any_other_method_is_guarded(served: Fixture, method: str) -> None:
    environ = headers(sec_fetch_site="cross-site")
    r = call(served.app, method, f"/api/trials/{served.ids['running']}/tell", {"state": "Fail"},
             environ=environ)
    assert r.status == FORBIDDEN


def test_a_trusted_origin_may_change_state_from_another_site(served: Fixture) -> None:
    inner = served.app.application.application  # inside create_app's own guard
    app = CrossOriginGuard(inner, trusted_origins=["https://tools.example.org:443"],
                           allowed_hosts=ALLOWED_HOSTS)
    cross = headers(sec_fetch_site="cross-site", origin="https://tools.example.org")
    r = call(app, "POST", f"/api/trials/{served.ids['running']}/tell", {"state": "Fail"},
             environ=cross)
    assert r.status == 204 and r.outcome is not None and r.outcome["to"] == "FAIL"
    other = headers(sec_fetch_site="cross-site", origin="https://tools.example.org:8443")
    r = call(app, "POST", f"/api/trials/{served.ids['running2']}/tell", {"state": "Fail"},
             environ=other)
    assert r.status == FORBIDDEN


@pytest.mark.parametrize(
    "origin", ["tools.example.org", "https://tools.example.org/app", "ftp://tools.example.org",
               "https://user@tools.example.org", "https://tools.example.org:99999"],
)
def test_a_trusted_origin_must_be_an_origin(origin: str) -> None:
    with pytest.raises(ValueError, match="origin"):
        CrossOriginGuard(lambda e, s: [], trusted_origins=[origin])


def test_the_guard_passes_the_layers_attributes_through(served: Fixture) -> None:
    """gunicorn's hooks and the tests use start_background, stop_background and sweeper."""
    guard = served.app.application
    assert isinstance(guard, CrossOriginGuard)
    assert callable(guard.start_background) and callable(guard.stop_background)
    assert guard.sweeper is served.app.sweeper
    with pytest.raises(AttributeError):
        guard.no_such_attribute


# -- framing ----------------------------------------------------------------------------------


def raw_headers(app: Any, path: str, **kw: Any) -> tuple[int, list[tuple[str, str]]]:
    """Status and the header list as sent (repeated headers kept)."""
    seen: list[tuple[str, str]] = []

    def recorder(environ: Any, start_response: Any) -> Any:
        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            seen[:] = headers
            return start_response(status, headers, exc_info)

        return app(environ, start)

    r = call(recorder, "GET", path, **kw)
    return r.status, seen


def policies(sent: list[tuple[str, str]]) -> list[str]:
    return [v for k, v in sent if k.lower() == "content-security-policy"]


def frame_options(sent: list[tuple[str, str]]) -> list[str]:
    return [v for k, v in sent if k.lower() == "x-frame-options"]


def test_the_dashboard_page_cannot_be_framed_by_another_site(served: Fixture) -> None:
    """Regression: the page with one-click PRUNE/FAIL buttons had no frame-ancestors and no
    X-Frame-Options, so another site could frame it and trick a click."""
    status, sent = raw_headers(served.app, f"/dashboard/studies/{served.study_id}")
    assert status == 200
    assert frame_options(sent) == ["SAMEORIGIN"]
    [policy] = policies(sent)
    # The dashboard's own policy is kept, made stricter.
    assert "script-src 'self' 'unsafe-eval'" in policy and "frame-src 'self'" in policy
    assert policy.endswith("; frame-ancestors 'self'")


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/hitl/actions", id="actions page"),
        pytest.param("/no/such/page", id="the dashboard's html 404"),
        pytest.param("/api/studies", id="json"),
        pytest.param("/hitl/static/hitl.js", id="our static file"),
        pytest.param("/healthz", id="health"),
    ],
)
def test_every_response_refuses_framing(served: Fixture, path: str) -> None:
    _, sent = raw_headers(served.app, path)
    assert frame_options(sent) == ["SAMEORIGIN"]
    [policy] = policies(sent)
    assert "frame-ancestors 'self'" in policy
    assert policy.count("frame-ancestors") == 1


def test_a_refusal_refuses_framing_too(served: Fixture) -> None:
    seen: list[tuple[str, str]] = []

    def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        seen[:] = headers
        return lambda data: None

    environ = {
        "REQUEST_METHOD": "POST", "PATH_INFO": "/api/studies", "CONTENT_LENGTH": "0",
        "HTTP_SEC_FETCH_SITE": "cross-site",
    }
    served.app.application(environ, start)
    assert ("X-Frame-Options", "SAMEORIGIN") in seen


@pytest.mark.parametrize(
    "given, expected_csp, expected_xfo",
    [
        pytest.param([], ["frame-ancestors 'self'"], ["SAMEORIGIN"], id="none"),
        pytest.param([("Content-Security-Policy", "default-src 'self';")],
                     ["default-src 'self'; frame-ancestors 'self'"], ["SAMEORIGIN"],
                     id="appended to a policy with a trailing semicolon"),
        pytest.param([("content-security-policy", "frame-ancestors 'none'")],
                     ["frame-ancestors 'none'"], ["SAMEORIGIN"], id="a stricter one is kept"),
        pytest.param([("X-Frame-Options", "DENY")], ["frame-ancestors 'self'"], ["DENY"],
                     id="x-frame-options deny is kept"),
        pytest.param([("Content-Security-Policy", "img-src 'self'"),
                      ("Content-Security-Policy", "Frame-Ancestors https://a.example")],
                     ["img-src 'self'", "Frame-Ancestors https://a.example"], ["SAMEORIGIN"],
                     id="a second policy that names frame-ancestors"),
    ],
)
def test_framing_headers_join_what_the_response_has(
    given: list[tuple[str, str]], expected_csp: list[str], expected_xfo: list[str]
) -> None:
    def inner(environ: Any, start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/html"), *given])
        return [b"<p>hi</p>"]

    _, sent = raw_headers(CrossOriginGuard(inner), "/")
    assert policies(sent) == expected_csp
    assert frame_options(sent) == expected_xfo


# -- the name the request was sent to: DNS rebinding ----------------------------------------

REBOUND = "http://rebind.example:8080"

HOSTS = [
    pytest.param({"host": "rebind.example:8080"}, FORBIDDEN, id="a name not on the list"),
    pytest.param({"host": "REBIND.example:8080"}, FORBIDDEN, id="a name not on the list, caps"),
    pytest.param({"host": "hitl.example.rebind.example"}, FORBIDDEN,
                 id="a name that starts like ours"),
    pytest.param({"host": "rebind.example", "x_forwarded_host": "hitl.example"}, ALLOWED,
                 id="a listed x-forwarded-host from a trusted proxy"),
    pytest.param({"host": "hitl.example", "x_forwarded_host": "rebind.example"}, FORBIDDEN,
                 id="an unlisted x-forwarded-host from a trusted proxy"),
    pytest.param({"host": "HITL.example.:8080"}, ALLOWED, id="a listed name, caps, final dot"),
    pytest.param({"host": "127.0.0.1:8080"}, ALLOWED, id="an IPv4 address"),
    pytest.param({"host": "[::1]:8080"}, ALLOWED, id="an IPv6 address"),
    pytest.param({"host": "localhost:8080"}, ALLOWED, id="localhost"),
    pytest.param({"host": "app.localhost"}, ALLOWED, id="a name under .localhost"),
    pytest.param({"host": "localhost.rebind.example"}, FORBIDDEN,
                 id="a name that starts with localhost"),
    pytest.param({"host": ""}, ALLOWED, id="no host: not a browser"),
]


@pytest.mark.parametrize("given, expected", HOSTS)
def test_a_state_change_needs_a_name_this_server_is_reached_under(
    served: Fixture, given: dict[str, str], expected: int
) -> None:
    """Regression: a page under a name its owner points at this server (DNS rebinding) is
    same-origin to the browser, so Sec-Fetch-Site and Origin both agree with it."""
    environ = headers(sec_fetch_site="same-origin", **given)
    before = snapshot(served)
    r = call(served.app, "POST", f"/api/trials/{served.ids['running']}/tell",
             {"state": "Fail"}, environ=environ)
    assert r.status == expected, r.body
    if expected == FORBIDDEN:
        assert "--allowed-hosts" in r.json()["reason"]
        assert snapshot(served) == before


def test_a_name_reads_pass_and_any_host_can_be_allowed(sqlite_url: str) -> None:
    """Only state changes are held to the names; * allows any."""
    study, ids = make_study(sqlite_url)
    for allowed, expected in (((), FORBIDDEN), (("*",), ALLOWED)):
        settings = Settings(storage_url=sqlite_url, allowed_hosts=allowed)
        app = behind_proxy(create_app(settings, autostart=False), settings)
        environ = headers(sec_fetch_site="same-origin", host="rebind.example", origin=REBOUND)
        assert call(app, "GET", f"/api/studies/{study._study_id}", environ=environ).status == 200
        tell = call(app, "POST", f"/api/trials/{ids['running']}/tell", {"state": "Fail"},
                    environ=environ)
        assert tell.status == expected, tell.body


@pytest.mark.parametrize("setting, message", [
    ({"HITL_ALLOWED_HOSTS": "optuna.example.org,bad name"}, "--allowed-hosts"),
    ({"HITL_ALLOWED_HOSTS": "https://optuna.example.org"}, "--allowed-hosts"),
    ({"HITL_TRUSTED_ORIGINS": "tools.example.org"}, "--trusted-origins"),
])
def test_a_bad_name_or_origin_setting_says_which_and_how(
    setting: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        resolve({}, setting)
    assert message in str(raised.value) and "give e.g." in str(raised.value)


def test_the_settings_reach_the_guard(sqlite_url: str) -> None:
    settings = resolve({"storage_url": sqlite_url}, {
        "HITL_ALLOWED_HOSTS": "Optuna.Example.org", "HITL_TRUSTED_ORIGINS": "https://t.example",
    })
    guard = create_app(settings, autostart=False)
    assert guard.allowed_hosts == {"optuna.example.org"}
    assert guard.trusted_origins == {"https://t.example"}
