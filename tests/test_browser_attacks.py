"""Another site's page, in Chromium, against ``gunicorn wsgi:app``: it can neither change state
nor frame our pages, while the dashboard's own UI works, direct and behind nginx under /optuna/.

The attacker's pages come from a small HTTP server of this test on another loopback origin:
``127.0.0.1`` on another port (same site, another origin: ``Sec-Fetch-Site: same-site``) and
``localhost`` (another site: ``cross-site``). Playwright sees every answer, even those the
page may not read (no-cors), so each attack's status is asserted, and then the database.
Without Chromium, playwright or nginx these tests skip locally and fail when CI=true.
"""

from __future__ import annotations

import contextlib
import http.server
from pathlib import Path
import threading
from typing import Any
from typing import Iterator

from helpers import audit_rows
from optuna.storages import RDBStorage
from optuna.trial import TrialState
from processes import HOST
from processes import Server
from processes import gunicorn_server
import pytest
from test_browser import CHROMIUM
from test_browser import CHROMIUM_ARGS
from test_browser import SHOWN_STATE
from test_browser import STUDY
from test_browser import Pages
from test_browser import browser  # noqa: F401  (a fixture)
from test_browser import open_trial
from test_browser import pages  # noqa: F401  (a fixture)
from test_browser import seed
from test_browser import wait_shown
from test_proxy import PREFIX
from test_proxy import deployed
from test_proxy import unit_command

pytestmark = pytest.mark.e2e


class Attacker:
    """Serves the pages put in ``pages`` (path -> HTML) on a loopback port of its own."""

    def __init__(self) -> None:
        self.pages: dict[str, str] = {}
        served = self.pages

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802  (http.server's name)
                body = served.get(self.path, "no such page").encode()
                self.send_response(200 if self.path in served else 404)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def origin(self, host: str) -> str:
        return f"http://{host}:{self.port}"


@pytest.fixture
def attacker() -> Iterator[Attacker]:
    evil = Attacker()
    evil.thread.start()
    try:
        yield evil
    finally:
        evil.httpd.shutdown()
        evil.httpd.server_close()
        evil.thread.join(5)


@contextlib.contextmanager
def context(browser: Any) -> Iterator[Any]:  # noqa: F811
    """A page of its own; the attacker's pages log errors by design, so no console check."""
    ctx = browser.new_context()
    try:
        page = ctx.new_page()
        page.set_default_timeout(15_000)
        yield page
    finally:
        ctx.close()


def shipped_gunicorn(url: str, tmp_path: Path) -> contextlib.AbstractContextManager[Server]:
    """gunicorn as the systemd unit runs it (scripts/gunicorn.conf.py: gthread workers).

    Not gunicorn's default sync worker: it serves one connection at a time, and Chromium
    holds an idle one open while it loads frames of another origin (issue 8, item 7).
    """
    args, env = unit_command()
    return gunicorn_server(url, tmp_path, args=args, env=env)


def form_page(action: str, enctype: str, fields: dict[str, str]) -> str:
    inputs = "".join(
        f"<input type=hidden name='{name}' value='{value}'>" for name, value in fields.items()
    )
    return (
        f"<!doctype html><form method=POST enctype='{enctype}' action='{action}'>{inputs}"
        "</form><script>document.forms[0].submit()</script>"
    )


def fetch_page(url: str, body: str) -> str:
    return (
        "<!doctype html><script>"
        f"fetch({url!r}, {{method: 'POST', mode: 'no-cors', body: {body!r}}})"
        ".then(() => { document.title = 'sent' }, (e) => { document.title = String(e) });"
        "</script>"
    )


def state_of(url: str, trial_id: int) -> TrialState:
    storage = RDBStorage(url)
    try:
        return storage.get_trial(trial_id).state
    finally:
        storage.engine.dispose()


def everything(url: str) -> Any:
    """What an attack could change: studies, trials' states, notes and attrs, the audit."""
    storage = RDBStorage(url)
    try:
        studies = storage.get_all_studies()
        return (
            [(s._study_id, s.study_name, s.user_attrs, s.system_attrs) for s in studies],
            [
                (t._trial_id, t.state, t.user_attrs)
                for s in studies
                for t in storage.get_all_trials(s._study_id, deepcopy=False)
            ],
            [tuple(row) for row in audit_rows(url)],
        )
    finally:
        storage.engine.dispose()


@pytest.mark.parametrize("attacker_host", ["localhost", HOST],
                         ids=["cross-site (localhost)", "same-site (127.0.0.1, another port)"])
def test_another_origin_changes_nothing(
    attacker_host: str, attacker: Attacker, browser: Any, sqlite_url: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Regression: a page on another origin FAILed a running trial with a text/plain form
    post to the Fail button's route (and could reach every other state-changing route)."""
    study, ids = seed(RDBStorage(sqlite_url))
    sid = study._study_id
    with shipped_gunicorn(sqlite_url, tmp_path) as server:
        # One undoable action, for the attack on Undo: trial 0 relabelled by its note.
        assert server.put_note(sid, ids[0], 1, "PRUNE").outcome["action"] == "applied"
        [action] = server.get_json("/hitl/api/actions")["actions"]
        assert action["undoable"]
        before = everything(sqlite_url)
        victim = server.base
        fail = '{"state": "Fail"}'
        simple = {
            # A form's text/plain body can be made to read as JSON: name=value.
            "form text/plain tell": (
                f"{victim}/api/trials/{ids[2]}/tell",
                form_page(f"{victim}/api/trials/{ids[2]}/tell", "text/plain",
                          {'{"state": "Fail", "x": "': '"}'}),
            ),
            "form urlencoded tell": (
                f"{victim}/api/trials/{ids[3]}/tell",
                form_page(f"{victim}/api/trials/{ids[3]}/tell",
                          "application/x-www-form-urlencoded", {"state": "Fail"}),
            ),
            "no-cors fetch tell": (
                f"{victim}/api/trials/{ids[2]}/tell",
                fetch_page(f"{victim}/api/trials/{ids[2]}/tell", fail),
            ),
            "no-cors fetch undo": (
                f"{victim}/hitl/api/actions/{action['id']}/undo",
                fetch_page(f"{victim}/hitl/api/actions/{action['id']}/undo", "{}"),
            ),
            "no-cors fetch study rename": (
                f"{victim}/api/studies/{sid}/rename",
                fetch_page(f"{victim}/api/studies/{sid}/rename", '{"study_name": "pwned"}'),
            ),
            "no-cors fetch study create": (
                f"{victim}/api/studies",
                fetch_page(f"{victim}/api/studies",
                           '{"study_name": "pwned", "directions": ["minimize"]}'),
            ),
            "no-cors fetch user attrs": (
                f"{victim}/api/trials/{ids[3]}/user-attrs",
                fetch_page(f"{victim}/api/trials/{ids[3]}/user-attrs",
                           '{"user_attrs": {"pwned": 1}}'),
            ),
        }
        origin = attacker.origin(attacker_host)
        with context(browser) as page:
            statuses = {}
            for name, (target, html) in simple.items():
                path = "/" + name.replace(" ", "-") + ".html"
                attacker.pages[path] = html
                with page.expect_response(
                    lambda r, target=target: r.url == target and r.request.method == "POST"
                ) as answer:
                    # Not "load": a form's navigation to a 204 never loads anything.
                    page.goto(origin + path, wait_until="commit")
                response = answer.value
                # A no-cors answer is opaque: its body is kept from the page, and from us.
                readable = name.startswith("form") and response.status == 403
                reason = response.json()["reason"] if readable else None
                statuses[name] = (response.status, reason)

            # PUT and DELETE need a CORS preflight, which the server never grants.
            attacker.pages["/preflighted.html"] = "<!doctype html><p>preflighted</p>"
            page.goto(origin + "/preflighted.html")
            preflighted = page.evaluate(
                """async ([note, study]) => {
                    const tries = [
                        [note, {method: "PUT", headers: {"Content-Type": "application/json"},
                                body: JSON.stringify({version: 1, body: "FAIL"})}],
                        [note, {method: "PUT", mode: "no-cors", body: "FAIL"}],
                        [study, {method: "DELETE"}],
                    ];
                    const out = [];
                    for (const [url, init] of tries) {
                        try { await fetch(url, init); out.push("sent"); }
                        catch (e) { out.push(e.name); }
                    }
                    return out;
                }""",
                [f"{victim}/api/studies/{sid}/{ids[2]}/note", f"{victim}/api/studies/{sid}"],
            )

        assert state_of(sqlite_url, ids[2]) is TrialState.RUNNING
        assert state_of(sqlite_url, ids[3]) is TrialState.RUNNING
        assert server.trial_detail(sid, ids[2])["note"] == {"version": 0, "body": ""}
        assert everything(sqlite_url) == before
        site = "cross-site" if attacker_host == "localhost" else "same-site"
        assert {name: status for name, (status, _) in statuses.items()} == {
            name: 403 for name in simple
        }, statuses
        reasons = [reason for _, reason in statuses.values() if reason is not None]
        assert len(reasons) == 2
        assert all(f"Sec-Fetch-Site: {site}" in reason for reason in reasons), reasons
        assert preflighted == ["TypeError"] * 3
        server.check_alive()


FRAMED = """<!doctype html>
<iframe id=dashboard src="{victim}/dashboard" onload="this.dataset.loaded = 1"></iframe>
<iframe id=actions src="{victim}/hitl/actions" onload="this.dataset.loaded = 1"></iframe>
"""


def frame_loaded_ours(frame: Any) -> bool:
    """Whether the frame shows our page (the dashboard's or the actions view, with hitl.js)."""
    try:
        return bool(frame.evaluate("!!document.querySelector('script[src*=\"hitl.js\"]')"))
    except Exception:  # an error page Playwright may not enter
        return False


def test_another_site_cannot_frame_our_pages(
    attacker: Attacker, browser: Any, sqlite_url: str, tmp_path: Path  # noqa: F811
) -> None:
    """Regression: the dashboard page with one-click PRUNE/FAIL buttons could be framed by
    another site (no frame-ancestors, no X-Frame-Options), to trick a click."""
    seed(RDBStorage(sqlite_url))
    with shipped_gunicorn(sqlite_url, tmp_path) as server:
        attacker.pages["/frame.html"] = FRAMED.format(victim=server.base)
        with context(browser) as page:
            refused: list[str] = []
            page.on("console", lambda m: refused.append(m.text) if m.type == "error" else None)
            blocked: dict[str, str | None] = {}
            page.on("requestfailed", lambda r: blocked.update({r.url: r.failure}))
            page.goto(attacker.origin("localhost") + "/frame.html")
            page.wait_for_function(
                "[...document.querySelectorAll('iframe')].every((f) => f.dataset.loaded)"
            )
            children = [f for f in page.frames if f is not page.main_frame]
            assert len(children) == 2
            assert [frame_loaded_ours(f) for f in children] == [False, False]
            assert blocked == {
                f"{server.base}{path}": "net::ERR_BLOCKED_BY_RESPONSE"
                for path in ("/dashboard", "/hitl/actions")
            }
            assert len([t for t in refused if "frame-ancestors 'self'" in t]) == 2, refused

            # Our own pages may still frame each other: same origin.
            page.goto(f"{server.base}/hitl/actions")
            page.evaluate(
                """() => new Promise((done) => {
                    const f = document.createElement("iframe");
                    f.onload = done;
                    f.src = "../dashboard";
                    document.body.append(f);
                })"""
            )
            [inner] = [f for f in page.frames if f is not page.main_frame]
            assert frame_loaded_ours(inner)


@pytest.mark.parametrize("where", ["direct", "nginx /optuna/"])
def test_the_dashboards_own_buttons_still_work(
    where: str, pages: Pages, sqlite_url: str, tmp_path: Path  # noqa: F811
) -> None:
    """The guard refuses other origins only: the UI's own Prune click and the dashboard's
    Fail Trial button change state, direct and behind nginx under /optuna/."""
    study, ids = seed(RDBStorage(sqlite_url))
    sid = study._study_id
    with contextlib.ExitStack() as stack:
        if where == "direct":
            base = stack.enter_context(gunicorn_server(sqlite_url, tmp_path)).base
        else:
            base = stack.enter_context(deployed(sqlite_url, tmp_path)).base + PREFIX
        page, _ = pages.open()
        page.goto(f"{base}/dashboard/studies/{sid}/trials")
        page.get_by_text(STUDY).first.wait_for()

        open_trial(page, 2, ids[2])
        page.locator(".hitl-bar button[data-command=PRUNE]").click()
        wait_shown(page, SHOWN_STATE, f"Trial 2 (trial_id={ids[2]})", "Pruned", 5)
        assert state_of(sqlite_url, ids[2]) is TrialState.PRUNED

        # The dashboard's own Fail Trial button: its tell, the very route of the attack.
        open_trial(page, 3, ids[3])
        page.get_by_role("button", name="Fail Trial").click()
        wait_shown(page, SHOWN_STATE, f"Trial 3 (trial_id={ids[3]})", "Fail", 5)
        assert state_of(sqlite_url, ids[3]) is TrialState.FAIL
        pages.finish()


@pytest.mark.parametrize("prefix", ["", PREFIX], ids=["root", "prefix"])
def test_behind_nginx_the_origin_is_checked_against_the_browsers_host(
    prefix: str, sqlite_url: str, tmp_path: Path
) -> None:
    """A plain-http browser on another machine sends Origin but no Sec-Fetch-Site: the check
    then rests on the host nginx forwards (scripts/nginx: Host and X-Forwarded-Host with the
    port), which must be the one the browser asked for."""
    _, ids = seed(RDBStorage(sqlite_url))
    with deployed(sqlite_url, tmp_path, env={"HITL_ALLOWED_HOSTS": "optuna.example.org"}) as proxy:
        tell = f"{prefix}/api/trials/{{}}/tell"
        port = proxy.base.rsplit(":", 1)[1]
        fail = {"state": "Fail"}
        other_port = proxy.request("POST", tell.format(ids[2]), json=fail,
                                   headers={"Origin": f"http://{HOST}:{int(port) + 1}"})
        other_host = proxy.request("POST", tell.format(ids[2]), json=fail,
                                   headers={"Origin": f"http://localhost:{port}"})
        assert (other_port.status, other_host.status) == (403, 403)
        assert state_of(sqlite_url, ids[2]) is TrialState.RUNNING
        # The same request from a page of the site the browser asked nginx for.
        named = proxy.request(
            "POST", tell.format(ids[2]), json=fail,
            headers={"Host": f"optuna.example.org:{port}",
                     "Origin": f"http://optuna.example.org:{port}"},
        )
        assert named.status == 204, named
        # A name the server was not told it is reached under: a rebinding page's own.
        unnamed = proxy.request(
            "POST", tell.format(ids[3]), json=fail,
            headers={"Host": f"rebind.example:{port}", "Origin": f"http://rebind.example:{port}"},
        )
        assert unnamed.status == 403 and "--allowed-hosts" in unnamed.json["reason"], unnamed
        own = proxy.request("POST", tell.format(ids[3]), json=fail,
                            headers={"Origin": proxy.base})
        assert own.status == 204, own
        assert state_of(sqlite_url, ids[3]) is TrialState.FAIL


@pytest.mark.parametrize("allowed", ["", "rebind.test"], ids=["unlisted", "allowed"])
def test_a_page_under_a_name_that_points_here_cannot_act_unless_the_name_is_allowed(
    allowed: str, browser: Any, sqlite_url: str, tmp_path: Path  # noqa: F811
) -> None:
    """DNS rebinding: Chromium resolves rebind.test to this server (--host-resolver-rules, as a
    rebinding attacker's DNS would), so the page is same-origin to itself and its fetch carries
    Sec-Fetch-Site: same-origin. Only the name tells it apart: refused unless on
    --allowed-hosts; the same fetch from 127.0.0.1 always works."""
    _, ids = seed(RDBStorage(sqlite_url))
    env = {"HITL_ALLOWED_HOSTS": allowed} if allowed else {}
    with gunicorn_server(sqlite_url, tmp_path, env=env) as server:
        port = server.base.rsplit(":", 1)[1]
        # A Chromium of its own: the resolver rule is a launch argument.
        chromium = browser.browser_type.launch(
            executable_path=CHROMIUM, headless=True,
            args=[*CHROMIUM_ARGS, f"--host-resolver-rules=MAP rebind.test {HOST}"],
        )
        try:
            page = chromium.new_page()
            tell = (
                "async (id) => (await fetch(`/api/trials/${id}/tell`, {method: 'POST', "
                "headers: {'Content-Type': 'application/json'}, body: '{\"state\": \"Fail\"}'}))"
                ".status"
            )
            page.goto(f"http://rebind.test:{port}/healthz")  # a page without hitl.js
            rebound = page.evaluate(tell, ids[2])
            page.goto(f"http://{HOST}:{port}/healthz")
            own = page.evaluate(tell, ids[3])
        finally:
            chromium.close()
    assert own == 204
    assert state_of(sqlite_url, ids[3]) is TrialState.FAIL
    if allowed:
        assert rebound == 204
        assert state_of(sqlite_url, ids[2]) is TrialState.FAIL
    else:
        assert rebound == 403
        assert state_of(sqlite_url, ids[2]) is TrialState.RUNNING
