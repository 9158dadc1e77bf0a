"""The Human actions page in Chromium, against ``gunicorn wsgi:app``: filters, pages, the CSV
link, an Undo that asks first, and a table that fits 1000 px without broken wrapping.

Takes docs/actions-view.png (1000x800) into tmp_path, or into HITL_TEST_SCREENSHOTS."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from optuna.storages import RDBStorage
from optuna.trial import TrialState
from processes import gunicorn_server
import pytest
import sqlalchemy as sa
from test_actions_view import entry
from test_actions_view import insert
from test_browser import STUDY
from test_browser import Pages
from test_browser import browser  # noqa: F401 (a fixture)
from test_browser import pages  # noqa: F401 (a fixture)
from test_browser import seed
from test_browser import state_of

from hitl_pruner.audit import AuditEntry

pytestmark = pytest.mark.e2e

NARROW = {"width": 1000, "height": 800}
# Names as long as people give them, for the wrapping check.
LONG_STUDY = "resnet50-imagenet-lr-sweep-2024-05-with-a-rather-long-name"


def varied(i: int, sid: int, other: int, trial_id: int) -> AuditEntry:
    """The i-th of many made-up actions: two studies, users ann and bob (every fifth), ends of
    running trials and relabels, some by the trial's worker."""
    made = entry(sid if i % 2 else other, trial_id, 1 + i % 40,
                 user=("bob" if i % 5 == 0 else "ann"),
                 study_name=STUDY if i % 2 else LONG_STUDY,
                 to=TrialState.FAIL if i % 3 == 0 else TrialState.PRUNED)
    if i % 7 == 0:
        return dataclasses.replace(made, from_state=TrialState.COMPLETE, retroactive=True)
    return dataclasses.replace(made, how="worker") if i % 4 == 0 else made


# The table's rows as objects, in the page's JavaScript.
ROWS = """[...document.querySelectorAll('#hitl-actions tr')].map((tr) => ({
    id: tr.dataset.id, user: tr.children[1].textContent, study: tr.children[2].textContent,
    change: tr.children[4].textContent }))"""


def rows_shown(page: Any) -> list[dict[str, str]]:
    return page.evaluate(f"() => {ROWS}")


def wait_rows(page: Any, check: str) -> None:
    """Wait until the table's rows (as rows_shown gives them, ``rows``) satisfy ``check``.

    The check must hold only for the page asked for: while a filter's answer is on its way the
    table still shows the previous page, which a bare row count may match too."""
    page.wait_for_function(f"() => {{ const rows = {ROWS}; return {check}; }}")


def test_filter_page_and_undo_with_confirmation_at_1000_px(
    sqlite_url: str, pages: Pages, tmp_path: Path  # noqa: F811
) -> None:
    url = sqlite_url
    study, ids = seed(RDBStorage(url))
    sid = study._study_id
    with gunicorn_server(url, tmp_path) as server:
        # 250 actions of others, then a real relabel to undo: the newest.
        other = RDBStorage(url).create_new_study([], LONG_STUDY)
        insert(url, [varied(i, sid, other, ids[1]) for i in range(250)])
        reply = server.put_note(sid, ids[0], 1, "bad split\nFAIL")
        assert reply.status == 204 and reply.outcome["to"] == "FAIL"
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            relabel_id = conn.exec_driver_sql(
                "SELECT max(id) FROM hitl_audit"
            ).scalar()
        engine.dispose()

        page, _ = pages.open()
        page.set_viewport_size(NARROW)
        page.goto(f"{server.base}/hitl/actions")
        page.wait_for_function("() => document.body.dataset.loaded === 'true'")

        # Pages of 100, newest first; Older and Newer walk them without repeats.
        first = rows_shown(page)
        assert len(first) == 100
        assert page.locator("#hitl-newer").is_disabled()
        page.locator("#hitl-older").click()
        wait_rows(page, f"rows.length === 100 && rows[0].id !== '{first[0]['id']}'")
        second = rows_shown(page)
        assert int(second[0]["id"]) == int(first[-1]["id"]) - 1
        assert f"before={first[-1]['id']}" in page.url
        page.locator("#hitl-older").click()
        wait_rows(page, "rows.length === 51")  # 251 in all
        assert page.locator("#hitl-older").is_disabled()
        page.locator("#hitl-newer").click()
        wait_rows(page, f"rows[0].id === '{second[0]['id']}'")
        page.locator("#hitl-newest").click()
        wait_rows(page, f"rows[0].id === '{first[0]['id']}'")

        shots = Path(os.environ.get("HITL_TEST_SCREENSHOTS") or tmp_path)
        shots.mkdir(exist_ok=True)
        page.mouse.move(0, 0)
        page.evaluate("() => window.scrollTo(0, 0)")
        page.screenshot(path=str(shots / "actions-view.png"))
        # The whole table fits 1000 px: no sideways scroll, every row one line of text.
        layout = page.evaluate("""() => {
            const rows = [...document.querySelectorAll('#hitl-actions tr')];
            return { overflow: document.documentElement.scrollWidth - window.innerWidth,
                     heights: [...new Set(rows.map(
                       (r) => Math.round(r.getBoundingClientRect().height)))],
                     header: document.querySelector('.hitl-actions-table thead tr')
                       .getBoundingClientRect().height };
        }""")
        assert layout["overflow"] <= 0, layout
        # A wrapped cell adds a line (+50%); a tag or the Undo button adds a few pixels.
        assert max(layout["heights"]) < 1.3 * min(layout["heights"]), layout
        assert layout["header"] < 45, layout

        # Filter by user: typed, then Enter. The address, the CSV link and the rows follow.
        page.locator("input[name=user]").fill("bob")
        page.locator("input[name=user]").press("Enter")
        wait_rows(page, "rows.length === 50 && rows.every((r) => r.user === 'bob')")
        assert "user=bob" in page.url
        csv_href = page.locator("#hitl-csv-link").get_attribute("href")
        assert csv_href == "/hitl/api/actions.csv?user=bob"
        csv = server.get(csv_href)
        assert csv.status == 200 and csv.text.count("\r\n") == 51

        # Study and action from their lists, at once; the trial box opens with a study.
        page.locator("#hitl-clear").click()
        wait_rows(page, "rows.length === 100")
        assert page.locator("input[name=trial]").is_disabled()
        page.locator("select[name=study]").select_option(str(sid))
        wait_rows(page, f"rows.length === 100 && rows.every((r) => r.study === '{STUDY}')")
        assert page.locator("#hitl-dashboard-link").get_attribute("href") == (
            f"/dashboard/studies/{sid}"
        )
        assert {r["study"] for r in rows_shown(page)} == {STUDY}
        page.locator("select[name=action]").select_option("relabel")
        wait_rows(page, f"rows.length < 100 && rows[0].id === '{relabel_id}'")
        assert all("relabel" in r["change"] for r in rows_shown(page))
        page.locator("input[name=trial]").fill("0")
        page.locator("input[name=trial]").press("Enter")
        wait_rows(page, f"rows.length === 1 && rows[0].id === '{relabel_id}'")
        assert f"study={sid}&trial=0&action=relabel" in page.url

        # Undo asks first: Cancel changes nothing, OK undoes.
        undo = page.locator("#hitl-actions button.hitl-btn-undo")
        questions: list[str] = []
        page.once("dialog", lambda d: (questions.append(d.message), d.dismiss()))
        undo.click()
        page.wait_for_timeout(300)
        assert questions and "Undo the relabel of trial 0" in questions[0]
        assert "FAIL is removed from the trial's note" in questions[0]
        assert state_of(url, ids[0]) is TrialState.FAIL
        page.once("dialog", lambda d: d.accept())
        undo.click()
        page.locator(".hitl-toast[data-action=applied]", has_text="FAIL \u2192 COMPLETE").wait_for()
        assert state_of(url, ids[0]) is TrialState.COMPLETE
        page.locator("select[name=action]").select_option("undo")
        wait_rows(page, "rows.length === 1 && rows[0].change.includes('undo')")
        # The row's trial link leads to the study's trial in the dashboard.
        href = page.locator("#hitl-actions tr a", has_text="Trial 0").get_attribute("href")
        assert href == f"/dashboard/studies/{sid}/trials?numbers=0"
        pages.finish()
