"""In Chromium, through ``gunicorn wsgi:app``: the bulk-action panel, and a reason with the
per-trial buttons (fixtures and helpers of test_browser.py).

The SQLite run takes bulk-actions.png and reason.png into the test's tmp_path, or into the
folder HITL_TEST_SCREENSHOTS names (``docs`` to refresh the README's copies).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState
from processes import gunicorn_server
from processes import wait_for
import pytest
from test_browser import LISTED_STATE
from test_browser import SHOWN_STATE
from test_browser import STUDY
from test_browser import VIEWPORT
from test_browser import Pages
from test_browser import browser  # noqa: F401 (a fixture)
from test_browser import open_trial
from test_browser import pages  # noqa: F401 (a fixture)
from test_browser import state_of
from test_browser import type_note
from test_browser import wait_shown

pytestmark = pytest.mark.e2e


def shots_dir(tmp_path: Path) -> Path:
    shots = Path(os.environ.get("HITL_TEST_SCREENSHOTS") or tmp_path)
    shots.mkdir(exist_ok=True)
    return shots


def study_of(url: str, running: int) -> tuple[optuna.Study, list[int]]:
    """Trials 0 and 1 COMPLETE, then ``running`` RUNNING ones with x = 0.1, 0.2, ..."""
    study = optuna.create_study(study_name=STUDY, storage=RDBStorage(url))
    ids = []
    for number in range(2 + running):
        x = 0.5 if number < 2 else round(0.1 * (number - 1), 1)
        trial = study.ask()
        trial.suggest_float("x", x, x)
        if number < 2:
            study.tell(trial, x)
        ids.append(trial._trial_id)
    return study, ids


def quiet(page: Any) -> None:
    page.mouse.move(VIEWPORT["width"] // 2, 5)
    page.evaluate("document.activeElement && document.activeElement.blur()")


def test_the_bulk_panel_previews_then_prunes_running_trials_in_a_parameter_range(
    sqlite_url: str, pages: Pages, tmp_path: Path,  # noqa: F811
) -> None:
    study, ids = study_of(sqlite_url, 6)  # trials 2-7 RUNNING, x 0.1 ... 0.6
    sid = study._study_id
    with gunicorn_server(sqlite_url, tmp_path) as server:
        page, _ = pages.open()
        page.goto(f"{server.base}/dashboard/studies/{sid}/trials")
        page.locator(".MuiListItemText-primary", has_text="Trial 7").first.wait_for()
        page.locator(".hitl-bulk-open").click()
        panel = page.locator(".hitl-bulk")
        panel.locator("select[name=state]").select_option("RUNNING")
        panel.locator("input[name=param]").fill("x")
        panel.locator("input[name=min]").fill("0.2")
        panel.locator("input[name=max]").fill("0.45")
        panel.locator("input[name=reason]").fill("lr too high")
        panel.locator(".hitl-bulk-preview").click()
        apply = panel.locator(".hitl-bulk-apply")
        page.wait_for_function(
            "() => document.querySelector('.hitl-bulk-apply').textContent === "
            "'Apply to 3 trials'")
        rows = panel.locator(".hitl-bulk-results tr")
        assert [rows.nth(i).locator("td").first.inner_text() for i in range(rows.count())] \
            == ["Trial 3", "Trial 4", "Trial 5"]
        assert "nothing changed yet" in panel.locator(".hitl-bulk-summary").inner_text()
        assert all(state_of(sqlite_url, t) is TrialState.RUNNING for t in ids[2:])
        quiet(page)
        page.screenshot(path=str(shots_dir(tmp_path) / "bulk-actions.png"))

        apply.click()
        assert apply.text_content() == "Confirm: prune 3 trials"  # nothing sent yet
        assert state_of(sqlite_url, ids[3]) is TrialState.RUNNING
        apply.click()
        page.locator(".hitl-toast[data-action=bulk]", has_text="prune: 3 applied").wait_for()
        assert panel.locator(".hitl-bulk-summary").inner_text() == "Done: 3 applied."
        for number in (3, 4, 5):
            wait_shown(page, LISTED_STATE, f"Trial {number}", "Pruned", 2)
            assert state_of(sqlite_url, ids[number]) is TrialState.PRUNED
        assert [state_of(sqlite_url, ids[n]) for n in (2, 6, 7)] == [TrialState.RUNNING] * 3
        assert server.trial_detail(sid, ids[4])["note"] == {
            "version": 1, "body": "lr too high\nPRUNE"}

        # A form change after the preview takes the Apply back: only what was previewed runs.
        panel.locator("input[name=trials]").fill("2")
        assert apply.is_disabled()
        # Bad input says why, in the panel.
        panel.locator("input[name=trials]").fill("2 x")
        panel.locator(".hitl-bulk-preview").click()
        panel.get_by_text('"x" is not a trial number').wait_for()

        # Pruning running trials needs no reload; relabelling a finished one says to reload
        # before editing its note here (the dashboard keeps the old note version until then).
        panel.locator("input[name=trials]").fill("0")
        panel.locator("select[name=state]").select_option("")
        panel.locator("input[name=param]").fill("")
        panel.locator("input[name=min]").fill("")
        panel.locator("input[name=max]").fill("")
        panel.locator("select[name=action]").select_option("fail")
        panel.locator(".hitl-bulk-preview").click()
        page.wait_for_function(
            "() => document.querySelector('.hitl-bulk-apply').textContent === "
            "'Apply to 1 trials'")
        apply.click()
        apply.click()
        page.locator(".hitl-toast[data-action=bulk]", has_text="fail: 1 applied").wait_for()
        assert panel.locator(".hitl-bulk-summary").inner_text() == (
            "Done: 1 applied. Reload the page before you edit those finished trials' notes here.")
        assert state_of(sqlite_url, ids[0]) is TrialState.FAIL
        toast = page.locator(".hitl-toast[data-action=bulk]", has_text="fail: 1 applied")
        assert toast.get_by_text("Reload page").count() == 1
        pages.finish()


def test_a_reason_goes_into_the_note_and_the_note_editor_then_saves_without_a_409(
    sqlite_url: str, pages: Pages, tmp_path: Path,  # noqa: F811
) -> None:
    study, ids = study_of(sqlite_url, 2)
    sid = study._study_id
    with gunicorn_server(sqlite_url, tmp_path) as server:
        page, _ = pages.open()
        page.goto(f"{server.base}/dashboard/studies/{sid}/trials")
        # A COMPLETE trial: the dashboard never fetches it again, so its note panel would keep
        # the note it had unless we tell it.
        open_trial(page, 0, ids[0])
        bar = page.locator(".hitl-bar")
        bar.locator("input.hitl-reason").fill("bad data split")
        bar.locator("button[data-command=FAIL]").click()
        wait_shown(page, SHOWN_STATE, f"Trial 0 (trial_id={ids[0]})", "Fail", 2)
        assert server.trial_detail(sid, ids[0])["note"] == {
            "version": 1, "body": "bad data split\nFAIL"}
        # The note panel shows the new note at once ...
        page.get_by_text("bad data split").first.wait_for(timeout=2000)
        page.locator(".hitl-toast[data-action=applied]").wait_for()
        quiet(page)
        page.screenshot(path=str(shots_dir(tmp_path) / "reason.png"))
        # ... so the next edit is saved, not met with a 409.
        type_note(page, "bad data split\nFAIL\n\nchecked again: still bad")
        page.locator(".hitl-toast[data-action='nothing to do']").wait_for()
        wait_for(lambda: server.trial_detail(sid, ids[0])["note"]["version"] == 2, timeout=5,
                 what="the second save")
        assert state_of(sqlite_url, ids[0]) is TrialState.FAIL
        pages.finish()
