"""In a real browser: Playwright drives Debian's Chromium against ``gunicorn wsgi:app``.

Chromium is /usr/bin/chromium (or HITL_TEST_CHROMIUM), launched headless; Playwright's own
browser download is never used. Without Chromium or the playwright package these tests skip
locally and fail when CI=true. Every page's console is collected: an error there (ours or the
dashboard's) or an uncaught exception fails the test.

The SQLite run of the main flow takes buttons.png and actions.png, the README's screenshots:
into the test's tmp_path, or into the folder HITL_TEST_SCREENSHOTS names (``docs`` to refresh
the README's copies), so a test run leaves the work tree as it was.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from typing import Iterator

from backends import unavailable
import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.artifacts import upload_artifact
from optuna.storages import BaseStorage
from optuna.storages import JournalStorage
from optuna.storages import RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from optuna_dashboard import ObjectiveSliderWidget
from optuna_dashboard import register_objective_form_widgets
from processes import Server
from processes import gunicorn_server
from processes import wait_for
import pytest

from hitl_pruner.dashboard import RELEASE
from hitl_pruner.dashboard import RELEASES
from hitl_pruner.requests import COOPERATIVE_ATTR

pytestmark = pytest.mark.e2e

CHROMIUM = os.environ.get("HITL_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1400, "height": 900}
# The promise: the new state shows within a second of the save.
SHOWN_WITHIN = 1.0
STUDY = "hitl-browser"
# A page with the dashboard's trial table: Smart Selection from optuna-dashboard 0.20 on; 0.19
# has no such page, and its Trial Table page shows the table.
TABLE_PAGE = "trialTable" if RELEASE is RELEASES["0.19"] else "smartSelection"

# The state the trial view shows: its first visible chip (ours stands in for a stale one).
SHOWN_STATE = """
(title) => {
  const h = [...document.querySelectorAll("h4")].find((e) => e.textContent === title);
  const row = h && h.nextElementSibling;
  if (!row) return null;
  const chip = [...row.children].find(
    (c) => c.matches(".MuiChip-root, .hitl-chip") && getComputedStyle(c).display !== "none"
  );
  return chip ? chip.textContent : null;
}
"""
LISTED_STATE = """
(name) => {
  const item = [...document.querySelectorAll(".MuiListItemText-primary")]
    .find((e) => e.textContent === name);
  const chips = item && item.closest(".MuiListItemText-root").nextElementSibling;
  if (!chips) return null;
  const chip = [...chips.children].find(
    (c) => c.matches(".MuiChip-root, .hitl-chip") && getComputedStyle(c).display !== "none"
  );
  return chip ? chip.textContent : null;
}
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).is_file():
        unavailable(f"Chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("the playwright package (pip install -e '.[test]')")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield chromium
        finally:
            chromium.close()


class Console:
    """Everything a page reported as an error, with where it came from."""

    def __init__(self, page: Any) -> None:
        self.errors: list[str] = []
        self.expected: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.errors.append(
            f"uncaught {error.name}: {error.message}\n{error.stack}"
        ))

    def _console(self, message: Any) -> None:
        if message.type == "error":
            error = f"console.error {message.text} at {message.location.get('url')}"
            if not any(part in error for part in self.expected):
                self.errors.append(error)

    def expect(self, part: str) -> None:
        """An error containing ``part`` is part of the test, e.g. a 409 it provokes."""
        self.expected.append(part)

    def ours(self) -> list[str]:
        return [e for e in self.errors if "/hitl/" in e or "hitl-pruner" in e]

    def check(self) -> None:
        assert self.ours() == [], "errors from hitl-pruner's files:\n" + "\n".join(self.ours())
        assert self.errors == [], "errors in the browser console:\n" + "\n".join(self.errors)


class Pages:
    """Browser contexts for one test; ``finish()`` closes them and checks their consoles.

    Call ``finish()`` while the server still runs: the dashboard polls it, and a poll that
    meets a stopped server is an error in the console too.
    """

    def __init__(self, browser: Any) -> None:
        self._browser = browser
        self._opened: list[tuple[Any, Console]] = []

    def open(self, **options: Any) -> tuple[Any, Console]:
        context = self._browser.new_context(viewport=VIEWPORT, **options)
        page = context.new_page()
        page.set_default_timeout(15_000)
        console = Console(page)
        self._opened.append((context, console))
        return page, console

    def close(self) -> None:
        for context, _ in self._opened:
            context.close()

    def finish(self) -> None:
        self.close()
        for _, console in self._opened:
            console.check()


@pytest.fixture
def pages(browser: Any) -> Iterator[Pages]:
    opened = Pages(browser)
    yield opened
    opened.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> tuple[str, str]:
    fixture = {"sqlite": "sqlite_url", "postgresql": "postgres_url"}[request.param]
    return request.param, request.getfixturevalue(fixture)


def seed(storage: BaseStorage, *, artifacts: Path | None = None) -> tuple[optuna.Study, list[int]]:
    """Trials 0 and 1 COMPLETE, 2 and 3 RUNNING (asked, never told); returns their ids."""
    study = optuna.create_study(study_name=STUDY, storage=storage)
    ids = []
    for number in range(4):
        trial = study.ask()
        x = trial.suggest_float("x", 0, 1)
        trial.report(x + 1, 0)
        if artifacts is not None and number == 0:
            path = artifacts.parent / "hello.txt"
            path.write_text("hello from trial 0")
            upload_artifact(
                artifact_store=FileSystemArtifactStore(str(artifacts)), file_path=str(path),
                study_or_trial=trial,
            )
        if number < 2:
            study.tell(trial, x)
        ids.append(trial._trial_id)
    return study, ids


def state_of(url: str, trial_id: int) -> TrialState:
    return RDBStorage(url).get_trial(trial_id).state


def open_trial(page: Any, number: int, trial_id: int) -> None:
    page.locator(".MuiListItemText-primary", has_text=f"Trial {number}").first.click()
    page.get_by_text(f"Trial {number} (trial_id={trial_id})", exact=True).wait_for()


def wait_shown(page: Any, script: str, arg: str, state: str, timeout: float) -> None:
    """Wait until the page shows ``state`` (a bound on a hang, not a measure: see shown_after)."""
    page.wait_for_function(
        f"([arg, state]) => ({script})(arg) === state", arg=[arg, state], timeout=timeout * 1000
    )


def note_when_shown(page: Any, script: str, arg: str, state: str) -> None:
    """Have the page note the time (``Date.now()``) its DOM first shows ``state`` for ``arg``."""
    page.evaluate(
        f"""([arg, state]) => {{
          const shown = {script};
          const key = `${{arg}}=${{state}}`;
          window.hitlShownAt = window.hitlShownAt || {{}};
          const look = () => {{
            if (!(key in window.hitlShownAt) && shown(arg) === state) {{
              window.hitlShownAt[key] = Date.now() / 1000;
              observer.disconnect();
            }}
          }};
          const observer = new MutationObserver(look);
          const all = {{subtree: true, childList: true, characterData: true, attributes: true}};
          observer.observe(document.body, all);
          look();
        }}""",
        [arg, state],
    )


def shown_after(page: Any, arg: str, state: str, at: float) -> float:
    """Seconds from ``at`` (``time.time()`` or the page's ``Date.now() / 1000``) to the moment
    the page noted ``state`` for ``arg`` on screen (``note_when_shown``): read on the page's
    clock, so Playwright's own round trips (Python, its node driver, Chromium, all on the same
    busy cores) do not count as the product's time."""
    key = f"{arg}={state}"
    try:
        page.wait_for_function("(key) => key in (window.hitlShownAt || {})", arg=key,
                               timeout=10_000)
    except Exception:
        toasts = page.locator(".hitl-toast").all_inner_texts()
        pytest.fail(f"{arg} never showed {state!r}; toasts: {toasts}", pytrace=False)
    return float(page.evaluate("(key) => window.hitlShownAt[key]", key)) - at


def note_click(page: Any) -> None:
    """Have the page note the time of its next click: the user's moment, on the page's clock.
    Its lists of requests and of long tasks start afresh (for ``since_click``)."""
    page.evaluate(
        """() => {
          performance.setResourceTimingBufferSize(1000);
          performance.clearResourceTimings();
          // Tasks that held the page's main thread over 50 ms (Chromium's Long Tasks API).
          window.hitlLongTasks = [];
          if (!window.hitlLongTaskObserver) {
            window.hitlLongTaskObserver = new PerformanceObserver((list) => {
              window.hitlLongTasks.push(...list.getEntries());
            });
            window.hitlLongTaskObserver.observe({type: "longtask"});
          }
          const noted = () => { window.hitlClickedAt = Date.now() / 1000; };
          document.addEventListener("click", noted, {capture: true, once: true});
        }"""
    )


def since_click(page: Any) -> tuple[list[tuple[str, float, float]], list[tuple[float, float]]]:
    """What the page did since ``note_click``, in seconds after the click on its own clock:
    its requests (path, start, end) and its long tasks (start, end), each in order of start.
    A slow answer tells itself from a busy page (the dashboard's renders are long tasks)."""
    requests, tasks = page.evaluate(
        """() => {
          const at = (ms) => (performance.timeOrigin + ms) / 1000 - window.hitlClickedAt;
          return [
            performance.getEntriesByType("resource").map(
              (e) => [e.name.replace(location.origin, ""), at(e.startTime),
                      at(e.startTime + e.duration)]),
            window.hitlLongTasks.map((e) => [at(e.startTime), at(e.startTime + e.duration)]),
          ];
        }"""
    )
    return [tuple(r) for r in requests], [tuple(t) for t in tasks]


def timeline(page: Any) -> str:
    """``since_click`` for a failure message."""
    requests, tasks = since_click(page)
    shown = [f"{path} {start:.3f}-{end:.3f}" for path, start, end in requests]
    busy = [f"{start:.3f}-{end:.3f}" for start, end in tasks]
    return f"requests since the click: {shown}; long tasks of the page: {busy}"


def shown_within(page: Any, checks: list[tuple[str, str]], state: str, seconds: float) -> None:
    """Each (script, arg) of ``checks`` showed ``state`` within ``seconds`` of the click noted
    by ``note_click``, on the page's own clock."""
    clicked = float(page.evaluate("() => window.hitlClickedAt"))
    for script, arg in checks:
        took = shown_after(page, arg, state, clicked)
        # Shown before the click would be a stale page, not a fast one.
        if not 0 <= took < seconds:
            toasts = page.locator(".hitl-toast").all_inner_texts()
            pytest.fail(f"{arg} showed {state!r} {took:.3f} s after the click; {toasts}; "
                        f"{timeline(page)}")


def type_note(page: Any, text: str) -> None:
    """Open the note editor of the trial on view, replace its text and save, as a user does."""
    page.locator("h5", has_text="Note").locator("xpath=following-sibling::div[1]//button").click()
    editor = page.locator("textarea").first
    editor.fill(text)
    note_click(page)  # the save's moment, for shown_within
    page.get_by_role("button", name="Save").click()


def test_prune_a_running_trial_fail_a_complete_one_and_undo_it(
    backend: tuple[str, str], pages: Pages, tmp_path: Path
) -> None:
    name, url = backend
    study, ids = seed(RDBStorage(url))
    sid = study._study_id
    with gunicorn_server(url, tmp_path) as server:
        page, _ = pages.open()
        page.goto(f"{server.base}/dashboard")
        page.get_by_text(f"1. {STUDY}", exact=True).click()
        page.wait_for_url(f"**/dashboard/studies/{sid}")
        page.goto(f"{server.base}/dashboard/studies/{sid}/trials")

        # One click on Prune ends the running trial through its note.
        open_trial(page, 2, ids[2])
        prune = page.locator(".hitl-bar button[data-command=PRUNE]")
        prune.wait_for()
        assert page.locator(".hitl-bar button[data-command=FAIL]").is_visible()
        detail = f"Trial 2 (trial_id={ids[2]})"
        note_when_shown(page, SHOWN_STATE, detail, "Pruned")
        note_when_shown(page, LISTED_STATE, "Trial 2", "Pruned")
        note_click(page)
        prune.click()
        shown_within(page, [(SHOWN_STATE, detail), (LISTED_STATE, "Trial 2")], "Pruned",
                     SHOWN_WITHIN)
        # The click's first request of its own is the note's save: nothing waits before it.
        started: dict[str, float] = {}
        for path, start, _ in since_click(page)[0]:
            started.setdefault(path, start)  # in order of start: each path's first request
        save, ask = f"/api/studies/{sid}/{ids[2]}/note", f"/hitl/api/studies/{sid}/{ids[2]}"
        assert save in started and started.get(ask, 1e9) > started[save], timeline(page)
        toast = page.locator(".hitl-toast[data-action=applied]").last
        assert "Trial 2: RUNNING \u2192 PRUNED" in toast.inner_text()
        assert state_of(url, ids[2]) is TrialState.PRUNED
        assert server.trial_detail(sid, ids[2])["note"] == {"version": 1, "body": "PRUNE"}
        # A pruned trial offers no more buttons, and says why.
        assert page.locator(".hitl-bar button").count() == 0

        open_trial(page, 3, ids[3])
        page.locator(".hitl-bar button[data-command=PRUNE]").wait_for()
        page.mouse.move(VIEWPORT["width"] - 1, VIEWPORT["height"] - 1)
        page.evaluate("document.activeElement && document.activeElement.blur()")
        page.wait_for_function("() => !document.querySelector('.MuiTouchRipple-child')")
        shots = Path(os.environ.get("HITL_TEST_SCREENSHOTS") or tmp_path)
        if name == "sqlite":
            shots.mkdir(exist_ok=True)
            page.screenshot(path=str(shots / "buttons.png"))

        # FAIL typed into the note editor of a COMPLETE trial relabels it.
        open_trial(page, 0, ids[0])
        page.locator(".hitl-bar button[data-command=FAIL]").wait_for()
        title = f"Trial 0 (trial_id={ids[0]})"
        note_when_shown(page, SHOWN_STATE, title, "Fail")
        note_when_shown(page, LISTED_STATE, "Trial 0", "Fail")
        type_note(page, "bad data split\nFAIL")
        shown_within(page, [(SHOWN_STATE, title), (LISTED_STATE, "Trial 0")], "Fail", SHOWN_WITHIN)
        toast = page.locator(".hitl-toast[data-action=applied]").last
        assert "Trial 0: COMPLETE \u2192 FAIL" in toast.inner_text()
        assert "retroactive relabel" in toast.inner_text()
        # The dashboard's own message (the button's save earlier showed one too).
        page.get_by_text("Success to save the note").last.wait_for()
        assert state_of(url, ids[0]) is TrialState.FAIL

        # The actions view lists both, newest first, and undoes the relabel.
        page.locator(".hitl-bar a", has_text="Human actions").click()
        page.wait_for_url(f"**/hitl/actions?study={sid}")
        rows = page.locator("#hitl-actions tr")
        rows.first.locator("button.hitl-btn-undo").wait_for()
        # "Dashboard" leads back to the study the actions were opened from, as does its name.
        back = page.locator("#hitl-dashboard-link").get_attribute("href")
        assert back == f"/dashboard/studies/{sid}", back
        study_link = rows.nth(0).locator(f"a[href='/dashboard/studies/{sid}']")
        assert study_link.inner_text() == STUDY
        assert rows.count() == 2
        assert rows.nth(0).get_attribute("data-trial") == str(ids[0])
        assert "COMPLETE \u2192 FAIL" in rows.nth(0).inner_text()
        assert "relabel" in rows.nth(0).inner_text()
        assert "RUNNING \u2192 PRUNED" in rows.nth(1).inner_text()
        assert rows.nth(1).locator("button").count() == 0
        if name == "sqlite":
            page.screenshot(path=str(shots / "actions.png"))
        page.once("dialog", lambda dialog: dialog.accept())  # Undo asks first
        rows.first.locator("button.hitl-btn-undo").click()
        page.locator(".hitl-toast[data-action=applied]", has_text="FAIL \u2192 COMPLETE").wait_for()
        wait_for(lambda: rows.count() == 3, timeout=5, what="the undo in the list")
        assert "FAIL \u2192 COMPLETE" in rows.nth(0).inner_text()
        assert "undo" in rows.nth(0).inner_text()
        assert state_of(url, ids[0]) is TrialState.COMPLETE
        assert server.trial_detail(sid, ids[0])["note"] == {"version": 2, "body": "bad data split"}

        page.locator("#hitl-actions tr a", has_text="Trial 0").first.click()
        wait_shown(page, SHOWN_STATE, title, "Complete", 5)
        page.get_by_text("bad data split", exact=True).wait_for()
        pages.finish()


def test_the_dashboard_still_works_around_us_in_dark_mode(
    sqlite_url: str, pages: Pages, tmp_path: Path
) -> None:
    """Study list, plots, trial table, notes, form widgets and artifacts, with our files in."""
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    storage = RDBStorage(sqlite_url)
    study, ids = seed(storage, artifacts=artifacts)
    register_objective_form_widgets(
        study, widgets=[ObjectiveSliderWidget(min=0, max=10, step=1, description="Score")]
    )
    sid = study._study_id
    env = {"HITL_ARTIFACT_DIR": str(artifacts)}
    with gunicorn_server(sqlite_url, tmp_path, env=env) as server:
        page, _ = pages.open(color_scheme="dark")
        base = f"{server.base}/dashboard"
        page.goto(base)
        page.get_by_text(f"1. {STUDY}", exact=True).wait_for()
        page.wait_for_function("() => document.documentElement.dataset.hitlTheme === 'dark'")

        page.goto(f"{base}/studies/{sid}")
        page.locator(".js-plotly-plot").first.wait_for()
        page.goto(f"{base}/studies/{sid}/analytics")
        page.locator(".js-plotly-plot").first.wait_for()
        page.goto(f"{base}/studies/{sid}/{TABLE_PAGE}")
        page.locator("table").first.wait_for()
        page.locator("table").get_by_text("Running", exact=True).first.wait_for()

        # The study's own note: saved by the dashboard, no command applied, no toast of ours.
        page.goto(f"{base}/studies/{sid}/note")
        type_note(page, "study notes: PRUNE the slow ones")
        page.get_by_text("Success to save the note").wait_for()
        wait_for(lambda: any(v == 1 for k, v in storage.get_study_system_attrs(sid).items()
                             if k == "dashboard:note_ver"), timeout=5, what="the study note")
        assert page.locator(".hitl-toast").count() == 0

        # The trial view: our bar, in the dashboard's colours.
        page.goto(f"{base}/studies/{sid}/trials")
        open_trial(page, 0, ids[0])
        page.get_by_text("hello.txt").first.wait_for()  # the artifact card
        label = page.locator(".hitl-bar-label")
        label.wait_for()
        assert label.evaluate("e => getComputedStyle(e).color") == "rgb(255, 255, 255)"

        # A plain note on a trial: the dashboard saves it, and we say there was nothing to do.
        type_note(page, "looks fine")
        page.locator(".hitl-toast[data-action='nothing to do']").wait_for()
        page.get_by_text("Success to save the note").first.wait_for()

        # A worker that runs HumanInTheLoopPruner is asked to end its trial: the state stays
        # until it does, and the message says so.
        storage.set_trial_system_attr(ids[2], COOPERATIVE_ATTR, True)
        open_trial(page, 2, ids[2])
        page.locator(".hitl-bar button[data-command=PRUNE]").click()
        requested = page.locator(".hitl-toast[data-action=requested]")
        requested.wait_for()
        assert "Requested from the worker: Trial 2 \u2192 PRUNED" in requested.inner_text()
        assert page.evaluate(SHOWN_STATE, f"Trial 2 (trial_id={ids[2]})") == "Running"

        # The HITL form widget of a running trial completes it through the dashboard's API.
        open_trial(page, 3, ids[3])
        page.get_by_role("button", name="Submit").click()
        wait_for(lambda: state_of(sqlite_url, ids[3]) is TrialState.COMPLETE, timeout=5,
                 what="the form widget to complete the trial")
        wait_shown(page, SHOWN_STATE, f"Trial 3 (trial_id={ids[3]})", "Complete", 5)

        # The dashboard's own colour switch: our parts follow it.
        page.locator("li[title='Dark Mode'] .MuiListItemButton-root").click()
        page.wait_for_function("() => document.documentElement.dataset.hitlTheme === 'light'")
        assert label.evaluate("e => getComputedStyle(e).color") == "rgba(0, 0, 0, 0.87)"
        pages.finish()


def test_refusals_and_conflicts_say_why_on_a_journal_storage(
    pages: Pages, tmp_path: Path
) -> None:
    url = str(tmp_path / "journal.log")
    study, ids = seed(JournalStorage(JournalFileBackend(url)))
    sid = study._study_id
    with gunicorn_server(url, tmp_path) as server:
        page, console = pages.open()
        page.goto(f"{server.base}/dashboard/studies/{sid}/trials")
        open_trial(page, 1, ids[1])
        bar = page.locator(".hitl-bar")
        bar.get_by_text("none possible").wait_for()
        assert "journal storage is append-only" in bar.inner_text()

        type_note(page, "FAIL")
        toast = page.locator(".hitl-toast[data-action=refused]")
        toast.wait_for()
        assert "Refused for Trial 1" in toast.inner_text()
        assert "journal storage is append-only" in toast.inner_text()
        assert_state(server, sid, ids[1], "Complete")

        # A running trial still has its buttons there.
        open_trial(page, 2, ids[2])
        note_when_shown(page, SHOWN_STATE, f"Trial 2 (trial_id={ids[2]})", "Fail")
        note_click(page)
        page.locator(".hitl-bar button[data-command=FAIL]").click()
        shown_within(page, [(SHOWN_STATE, f"Trial 2 (trial_id={ids[2]})")], "Fail", SHOWN_WITHIN)
        assert_state(server, sid, ids[2], "Fail")

        # Someone saves the note after the page read it and just before the button's save
        # arrives: the dashboard's version rule refuses ours, with the dashboard's own words.
        open_trial(page, 3, ids[3])
        button = page.locator(".hitl-bar button[data-command=PRUNE]")
        button.wait_for()

        def concurrent_edit(route: Any) -> None:
            assert server.put_note(sid, ids[3], 1, "someone else's words").status == 204
            route.continue_()

        page.route(f"**/api/studies/{sid}/{ids[3]}/note", concurrent_edit)
        console.expect(f"status of 409 (Conflict) at {server.base}/api/studies/{sid}/{ids[3]}/note")
        button.click()
        toast = page.locator(".hitl-toast[data-action=failed]")
        toast.wait_for()
        assert toast.inner_text().startswith(
            "Failed: The text you are editing has changed. Please copy your edits and refresh "
            "the page."
        )
        assert server.trial_detail(sid, ids[3])["note"] == {
            "version": 1, "body": "someone else's words"
        }
        assert_state(server, sid, ids[3], "Running")
        pages.finish()


def assert_state(server: Server, study_id: int, trial_id: int, state: str) -> None:
    assert server.trial_states(study_id)[trial_id] == state
