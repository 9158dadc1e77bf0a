"""Issue 10's features in Chromium through a real nginx only, with the dashboard under /optuna/.

``gunicorn wsgi:app`` runs as the systemd unit runs it (scripts/systemd, scripts/gunicorn.conf.py,
HITL_* settings), with HTTP basic auth so that every change has a user to show; nginx runs
scripts/nginx/hitl-pruner.conf on a free loopback port, which serves it under /optuna/ (nginx
passes the browser's Authorization header on). Every page, API call and link below goes through
nginx's /optuna/: Stop and Resume study, the bulk panel, a button with a reason followed by a
note edit, and the Human actions view (filters, links, CSV, Undo).

Waits are ``page.wait_for_function("() => ...")``, each naming the state it waits for: our
pages' CSP (script-src 'self') refuses the eval Playwright uses to poll a bare expression.
Takes nginx-study-stop.png, nginx-bulk.png and nginx-actions-view.png into the test's tmp_path,
or into the folder HITL_TEST_SCREENSHOTS names (``docs`` to refresh the copies there). Without
Chromium, playwright or nginx these tests skip locally and fail when CI=true.
"""

from __future__ import annotations

import contextlib
import csv
import os
from pathlib import Path
from typing import Any
from typing import Callable
from typing import Iterator

from helpers import audit_rows
import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState
from optuna_dashboard._note import get_note_from_system_attrs
from processes import gunicorn_server
from processes import wait_for
import pytest
import requests
from test_browser import STUDY
from test_browser import VIEWPORT
from test_browser import Pages
from test_browser import browser  # noqa: F401  (a fixture)
from test_browser import pages  # noqa: F401  (a fixture)
from test_browser import seed
from test_browser import state_of
from test_browser_bulk import study_of
from test_proxy import PREFIX
from test_proxy import nginx
from test_proxy import unit_command

import hitl_pruner
from hitl_pruner.auth import hash_password
from hitl_pruner.health import HEALTH_PATH

pytestmark = pytest.mark.e2e

USER, PASSWORD = "alice", "pw"
OTHER_STUDY = "hitl-browser-other"


def shots_dir(tmp_path: Path) -> Path:
    shots = Path(os.environ.get("HITL_TEST_SCREENSHOTS") or tmp_path)
    shots.mkdir(exist_ok=True)
    return shots


def healthy(base: str) -> bool:
    """Whether ``base`` answers the health probe (the one path basic auth lets through)."""
    try:
        with requests.get(base + HEALTH_PATH, timeout=2) as answer:
            return answer.status_code == 200
    except requests.RequestException:
        return False


@contextlib.contextmanager
def behind_nginx(url: str, tmp_path: Path) -> Iterator[str]:
    """gunicorn as the unit runs it, with basic auth, behind nginx: yields ``http://nginx/optuna``."""
    args, env = unit_command()
    env["HITL_BASIC_AUTH"] = f"{USER}:{hash_password(PASSWORD)}"
    # Every page but the health probe needs a login: the readiness check asks that.
    with gunicorn_server(url, tmp_path, args=args, env=env, ready="none") as server:
        wait_for(lambda: healthy(server.base), timeout=30, what="gunicorn's health probe",
                 servers=[server])
        # Basic auth answers 401 to /api/meta: the health probe is open.
        with nginx(server, tmp_path, ready=lambda p: healthy(p.base + PREFIX)) as proxy:
            yield proxy.base + PREFIX


def logged_in(pages: Pages) -> tuple[Any, Any]:  # noqa: F811
    return pages.open(http_credentials={"username": USER, "password": PASSWORD})


def note_of(url: str, study_id: int, trial_id: int) -> dict[str, Any]:
    storage = RDBStorage(url)
    try:
        attrs = storage.get_study_system_attrs(study_id)
    finally:
        storage.engine.dispose()
    return dict(get_note_from_system_attrs(attrs, trial_id))


def audited(url: str) -> list[tuple[int, str, str]]:
    """(study_id, user, how) of every audit row, oldest first. A study's stop or resume has a
    row of its own, whose ``how`` says which and how many live workers were told (none here)."""
    return [(r.study_id, r.user_name, r.how) for r in audit_rows(url)]


def answer(asked: list[str], *, accept: bool) -> Callable[[Any], None]:
    """A dialog handler: note the question in ``asked``, then say OK or Cancel."""

    def handle(dialog: Any) -> None:
        asked.append(dialog.message)
        if accept:
            dialog.accept()
        else:
            dialog.dismiss()

    return handle


def quiet(page: Any) -> None:
    """No hover or focus ring in a screenshot."""
    page.mouse.move(VIEWPORT["width"] // 2, 5)
    page.evaluate("() => document.activeElement && document.activeElement.blur()")


# The state the trial view shows for a title: its first visible chip (ours or the dashboard's).
SHOWN_STATE = """([title, state]) => {
  const h = [...document.querySelectorAll("h4")].find((e) => e.textContent === title);
  const row = h && h.nextElementSibling;
  const chip = row && [...row.children].find(
    (c) => c.matches(".MuiChip-root, .hitl-chip") && getComputedStyle(c).display !== "none");
  return !!chip && chip.textContent === state;
}"""
# The state the trial list shows for "Trial N".
LISTED_STATE = """([name, state]) => {
  const item = [...document.querySelectorAll(".MuiListItemText-primary")]
    .find((e) => e.textContent === name);
  const chips = item && item.closest(".MuiListItemText-root").nextElementSibling;
  const chip = chips && [...chips.children].find(
    (c) => c.matches(".MuiChip-root, .hitl-chip") && getComputedStyle(c).display !== "none");
  return !!chip && chip.textContent === state;
}"""
# A toast of ours with this data-action whose text contains this.
TOAST = """([action, text]) => [...document.querySelectorAll(".hitl-toast")]
  .some((t) => t.dataset.action === action && t.textContent.includes(text))"""
# The note card of the trial on view (after its "Note" heading) shows this text.
NOTE_SHOWS = """(text) => {
  const h = [...document.querySelectorAll("h5")].find((e) => e.textContent === "Note");
  const card = h && h.nextElementSibling;
  return !!card && card.textContent.includes(text);
}"""
# The stop box of the study page, in this state (data-stopped "true" or "false").
STOP_BOX = """(stopped) => {
  const box = document.querySelector(".hitl-study-stop");
  return !!box && !box.hidden && box.dataset.stopped === stopped
    && !!box.querySelector(`button[data-stop="${stopped === "true" ? "false" : "true"}"]`);
}"""


# The actions table's rows as objects, in the page's JavaScript.
ROWS = """[...document.querySelectorAll('#hitl-actions tr')].map((tr) => ({
    id: tr.dataset.id, user: tr.children[1].textContent, study: tr.children[2].textContent,
    change: tr.children[4].textContent,
    studyHref: tr.children[2].querySelector('a').getAttribute('href'),
    trialHref: tr.children[3].querySelector('a').getAttribute('href'),
    undo: !!tr.querySelector('button.hitl-btn-undo') }))"""


def rows_shown(page: Any) -> list[dict[str, Any]]:
    return list(page.evaluate(f"() => {ROWS}"))


def wait_rows(page: Any, check: str) -> None:
    """Until the rows (``rows``) satisfy ``check``, which must hold only for the page asked for:
    while a filter's answer is on its way the table still shows the previous one."""
    page.wait_for_function(
        f"() => document.body.dataset.loaded === 'true' && (() => {{ const rows = {ROWS}; "
        f"return {check}; }})()")


def open_trial(page: Any, number: int, trial_id: int) -> None:
    page.locator(".MuiListItemText-primary", has_text=f"Trial {number}").first.click()
    page.wait_for_function(
        "(title) => [...document.querySelectorAll('h4')].some((e) => e.textContent === title)",
        arg=f"Trial {number} (trial_id={trial_id})",
    )


def wait_bar(page: Any, command: str) -> None:
    """Until the trial view's bar of ours offers ``command`` (PRUNE or FAIL)."""
    page.wait_for_function(
        "(command) => !!document.querySelector(`.hitl-bar button[data-command=${command}]`)",
        arg=command,
    )


def type_note(page: Any, text: str) -> None:
    """Open the note editor of the trial on view, replace its text and save, as a user does."""
    page.locator("h5", has_text="Note").locator("xpath=following-sibling::div[1]//button").click()
    page.wait_for_function("() => !!document.querySelector('textarea')")
    page.locator("textarea").first.fill(text)
    page.get_by_role("button", name="Save").click()


def test_stop_study_and_resume_behind_nginx_under_optuna_and_the_banner_says_who(
    sqlite_url: str, pages: Pages, tmp_path: Path  # noqa: F811
) -> None:
    study, _ = seed(RDBStorage(sqlite_url))  # trials 0, 1 COMPLETE; 2, 3 RUNNING
    sid = study._study_id
    with behind_nginx(sqlite_url, tmp_path) as base:
        page, _ = logged_in(pages)
        dialogs: list[str] = []
        page.on("dialog", answer(dialogs, accept=True))
        page.goto(f"{base}/dashboard/studies/{sid}")
        page.wait_for_function(STOP_BOX, arg="false")
        page.locator(".hitl-study-stop button[data-stop=true]").click()
        page.wait_for_function(STOP_BOX, arg="true")
        # One question (the confirmation), and no alert of a refusal.
        assert len(dialogs) == 1 and dialogs[0].startswith("Stop this study?"), dialogs
        text = page.locator(".hitl-study-stop-text").inner_text()
        assert text.startswith(f"Study stopped by {USER} at "), text
        assert hitl_pruner.study_stopped(optuna.load_study(study_name=STUDY, storage=sqlite_url))
        assert audited(sqlite_url) == [(sid, USER, "stop:0")]
        # A reload through nginx shows the banner again: it is the server's state.
        page.reload()
        page.wait_for_function(STOP_BOX, arg="true")
        quiet(page)
        page.screenshot(path=str(shots_dir(tmp_path) / "nginx-study-stop.png"))

        page.locator(".hitl-study-stop button[data-stop=false]").click()
        page.wait_for_function(STOP_BOX, arg="false")
        assert len(dialogs) == 1, dialogs  # Resume asks nothing
        assert not hitl_pruner.study_stopped(
            optuna.load_study(study_name=STUDY, storage=sqlite_url))
        assert audited(sqlite_url) == [
            (sid, USER, "stop:0"), (sid, USER, "resume:0")]
        assert [state_of(sqlite_url, t._trial_id) for t in study.trials] == [
            TrialState.COMPLETE] * 2 + [TrialState.RUNNING] * 2
        pages.finish()


def test_the_bulk_panel_prunes_several_trials_with_a_reason_behind_nginx_under_optuna(
    sqlite_url: str, pages: Pages, tmp_path: Path  # noqa: F811
) -> None:
    study, ids = study_of(sqlite_url, 4)  # trials 0, 1 COMPLETE; 2-5 RUNNING
    sid = study._study_id
    reason = "lr too high"
    with behind_nginx(sqlite_url, tmp_path) as base:
        page, _ = logged_in(pages)
        page.goto(f"{base}/dashboard/studies/{sid}/trials")
        page.wait_for_function(LISTED_STATE, arg=["Trial 5", "Running"])
        page.locator(".hitl-bulk-open").click()
        panel = page.locator(".hitl-bulk")
        panel.locator("input[name=trials]").fill("2-4")
        panel.locator("select[name=state]").select_option("RUNNING")
        panel.locator("input[name=reason]").fill(reason)
        panel.locator(".hitl-bulk-preview").click()
        apply = panel.locator(".hitl-bulk-apply")
        page.wait_for_function(
            "() => document.querySelector('.hitl-bulk-apply').textContent === "
            "'Apply to 3 trials'")
        apply.click()
        assert apply.text_content() == "Confirm: prune 3 trials"  # nothing sent yet
        assert state_of(sqlite_url, ids[2]) is TrialState.RUNNING
        apply.click()
        page.wait_for_function(TOAST, arg=["bulk", "prune: 3 applied"])
        for number in (2, 3, 4):
            page.wait_for_function(LISTED_STATE, arg=[f"Trial {number}", "Pruned"])
        done = [
            panel.locator(".hitl-bulk-results tr").nth(i).locator("td").all_inner_texts()
            for i in range(3)
        ]
        assert [row[:3] for row in done] == [
            [f"Trial {n}", "RUNNING \u2192 PRUNED", "applied"] for n in (2, 3, 4)], done
        assert [state_of(sqlite_url, ids[n]) for n in range(6)] == [
            TrialState.COMPLETE] * 2 + [TrialState.PRUNED] * 3 + [TrialState.RUNNING]
        for number in (2, 3, 4):
            assert note_of(sqlite_url, sid, ids[number]) == {
                "version": 1, "body": f"{reason}\nPRUNE"}

        quiet(page)
        page.screenshot(path=str(shots_dir(tmp_path) / "nginx-bulk.png"))

        # The toast's link leads to the Human actions view under /optuna/, which lists the
        # three with their reason.
        page.locator(".hitl-toast[data-action=bulk] a", has_text="Human actions").click()
        page.wait_for_url(f"{base}/hitl/actions?study={sid}")
        wait_rows(page, f"rows.length === 3 && rows.every((r) => r.user === '{USER}' "
                        f"&& r.change.includes('PRUNED') && r.change.includes('{reason}'))")
        # So does the trial's note in the dashboard, once loaded again (a bulk action does not
        # refresh the dashboard's copy of the notes: hitl.js's toast offers "Reload page").
        page.goto(f"{base}/dashboard/studies/{sid}/trials")
        open_trial(page, 3, ids[3])
        page.wait_for_function(SHOWN_STATE, arg=[f"Trial 3 (trial_id={ids[3]})", "Pruned"])
        page.wait_for_function(NOTE_SHOWS, arg=reason)
        pages.finish()


@pytest.mark.parametrize(
    ("number", "command", "shown"), [(2, "PRUNE", "Pruned"), (0, "FAIL", "Fail")],
    ids=["prune a running trial", "fail a complete trial"],
)
def test_a_button_with_a_reason_then_a_note_edit_meets_no_409_behind_nginx_under_optuna(
    number: int, command: str, shown: str, sqlite_url: str, pages: Pages,  # noqa: F811
    tmp_path: Path,
) -> None:
    study, ids = seed(RDBStorage(sqlite_url))
    sid, tid = study._study_id, ids[number]
    reason = "bad data split"
    with behind_nginx(sqlite_url, tmp_path) as base:
        page, _ = logged_in(pages)
        saves: list[tuple[str, int]] = []
        note_path = f"{PREFIX}/api/studies/{sid}/{tid}/note"
        page.on("response", lambda r: saves.append((r.request.method, r.status))
                if r.url.endswith(note_path) else None)
        page.goto(f"{base}/dashboard/studies/{sid}/trials")
        open_trial(page, number, tid)
        wait_bar(page, command)
        page.locator(".hitl-bar input.hitl-reason").fill(reason)
        page.locator(f".hitl-bar button[data-command={command}]").click()
        page.wait_for_function(SHOWN_STATE, arg=[f"Trial {number} (trial_id={tid})", shown])
        page.wait_for_function(TOAST, arg=["applied", f"Trial {number}:"])
        assert note_of(sqlite_url, sid, tid) == {"version": 1, "body": f"{reason}\n{command}"}
        # The note panel shows the new note at once, so the next edit is saved, not refused.
        page.wait_for_function(NOTE_SHOWS, arg=reason)
        type_note(page, f"{reason}\n{command}\n\nchecked again: still bad")
        page.wait_for_function(TOAST, arg=["nothing to do", f"Trial {number}"])
        assert note_of(sqlite_url, sid, tid) == {
            "version": 2, "body": f"{reason}\n{command}\n\nchecked again: still bad"}
        assert saves == [("PUT", 204), ("PUT", 204)], saves
        assert state_of(sqlite_url, tid) is {"PRUNE": TrialState.PRUNED,
                                              "FAIL": TrialState.FAIL}[command]
        pages.finish()


def test_the_actions_view_filters_links_csv_and_undo_stay_under_optuna_behind_nginx(
    sqlite_url: str, pages: Pages, tmp_path: Path  # noqa: F811
) -> None:
    study, ids = seed(RDBStorage(sqlite_url))  # trials 0, 1 COMPLETE; 2, 3 RUNNING
    sid = study._study_id
    other = optuna.create_study(study_name=OTHER_STUDY, storage=sqlite_url)
    other_trial = other.ask()
    with behind_nginx(sqlite_url, tmp_path) as base:
        # Three actions, through nginx as a script would send them: a prune in each study and
        # a relabel (FAIL on a COMPLETE trial), the newest.
        auth = (USER, PASSWORD)
        for study_id, trial_id, body in [
            (other._study_id, other_trial._trial_id, "PRUNE"),
            (sid, ids[2], "PRUNE"),
            (sid, ids[0], "bad data split\nFAIL"),
        ]:
            reply = requests.put(f"{base}/api/studies/{study_id}/{trial_id}/note", auth=auth,
                                 json={"version": 1, "body": body}, timeout=30)
            assert reply.status_code == 204, reply.text

        page, _ = logged_in(pages)
        page.goto(f"{base}/hitl/actions")
        wait_rows(page, "rows.length === 3")
        assert page.locator("#hitl-dashboard-link").get_attribute("href") == f"{PREFIX}/dashboard"

        # By study, then by action: the rows, the address and the links follow.
        page.locator("select[name=study]").select_option(str(sid))
        wait_rows(page, f"rows.length === 2 && rows.every((r) => r.study === '{STUDY}')")
        page.locator("select[name=action]").select_option("relabel")
        wait_rows(page, "rows.length === 1 && rows[0].change.includes('relabel')")
        assert page.url == f"{base}/hitl/actions?study={sid}&action=relabel"
        [row] = rows_shown(page)
        assert row["user"] == USER
        assert "bad data split" in row["change"]  # the reason the note gave
        assert row["studyHref"] == f"{PREFIX}/dashboard/studies/{sid}"
        assert row["trialHref"] == f"{PREFIX}/dashboard/studies/{sid}/trials?numbers=0"
        assert page.locator("#hitl-dashboard-link").get_attribute("href") == (
            f"{PREFIX}/dashboard/studies/{sid}")
        csv_path = f"/hitl/api/actions.csv?study={sid}&action=relabel"
        assert page.locator("#hitl-csv-link").get_attribute("href") == PREFIX + csv_path
        quiet(page)
        page.screenshot(path=str(shots_dir(tmp_path) / "nginx-actions-view.png"))

        # The CSV link downloads, through nginx, the rows on view.
        with page.expect_download() as downloading:
            page.locator("#hitl-csv-link").click()
        download = downloading.value
        assert download.url == base + csv_path
        with open(download.path(), newline="") as downloaded:
            listed = list(csv.DictReader(downloaded))
        assert [(r["id"], r["study_id"], r["user"], r["from"], r["to"], r["reason"])
                for r in listed] == [
            (row["id"], str(sid), USER, "COMPLETE", "FAIL", "bad data split")], listed

        # Undo asks first: Cancel sends nothing, OK undoes.
        undo = page.locator("#hitl-actions button.hitl-btn-undo")
        undo_posts: list[str] = []
        page.on("request", lambda r: undo_posts.append(r.url)
                if r.method == "POST" and r.url.endswith("/undo") else None)
        questions: list[str] = []
        page.once("dialog", answer(questions, accept=False))
        undo.click()
        # confirm() returned false inside the click: had it said yes, the button would be
        # disabled and the request sent by now, in the same task.
        assert len(questions) == 1 and "Undo the relabel of trial 0" in questions[0], questions
        assert not undo.is_disabled()
        assert state_of(sqlite_url, ids[0]) is TrialState.FAIL
        page.once("dialog", answer(questions, accept=True))
        undo.click()
        page.wait_for_function(TOAST, arg=["applied", "FAIL \u2192 COMPLETE"])
        assert len(questions) == 2
        # One POST in all, under the prefix: the cancelled question sent none.
        assert undo_posts == [f"{base}/hitl/api/actions/{row['id']}/undo"], undo_posts
        assert state_of(sqlite_url, ids[0]) is TrialState.COMPLETE
        assert note_of(sqlite_url, sid, ids[0]) == {"version": 2, "body": "bad data split"}
        page.locator("select[name=action]").select_option("undo")
        wait_rows(page, "rows.length === 1 && rows[0].change.includes('undo')")

        # The row's study link and the Dashboard link lead to the study's page, under /optuna/,
        # and it loads: our stop box there has asked the API under the prefix.
        page.locator("#hitl-actions tr a", has_text=STUDY).click()
        page.wait_for_url(f"{base}/dashboard/studies/{sid}")
        page.wait_for_function(STOP_BOX, arg="false")
        page.go_back()
        wait_rows(page, "rows.length === 1 && rows[0].change.includes('undo')")
        page.locator("#hitl-dashboard-link").click()
        page.wait_for_url(f"{base}/dashboard/studies/{sid}")
        page.wait_for_function(STOP_BOX, arg="false")
        page.wait_for_function(
            "(name) => document.body.innerText.includes(name)", arg=STUDY)
        # The trial link opens the trial, relabelled back to COMPLETE.
        page.goto(f"{base}/hitl/actions?study={sid}&action=undo")
        wait_rows(page, "rows.length === 1 && rows[0].change.includes('undo')")
        page.locator("#hitl-actions tr a", has_text="Trial 0").click()
        page.wait_for_url(f"{base}/dashboard/studies/{sid}/trials?numbers=0")
        page.wait_for_function(SHOWN_STATE, arg=[f"Trial 0 (trial_id={ids[0]})", "Complete"])
        pages.finish()
