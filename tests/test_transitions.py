from __future__ import annotations

from optuna.trial import TrialState as S
import pytest

from hitl_pruner.commands import Command as C
from hitl_pruner.transitions import Action as A
from hitl_pruner.transitions import LastChange
from hitl_pruner.transitions import decide

RELABELLED_PRUNED = LastChange(S.PRUNED, retroactive=True)
RELABELLED_FAIL = LastChange(S.FAIL, retroactive=True)
PRUNED_WHILE_RUNNING = LastChange(S.PRUNED, retroactive=False)
UNDONE = LastChange(S.COMPLETE, retroactive=True)


@pytest.mark.parametrize(
    "state, command, last, action, target",
    [
        pytest.param(S.RUNNING, C.PRUNE, None, A.APPLY, S.PRUNED, id="running-prune"),
        pytest.param(S.RUNNING, C.FAIL, None, A.APPLY, S.FAIL, id="running-fail"),
        pytest.param(S.WAITING, C.PRUNE, None, A.APPLY, S.PRUNED, id="waiting-prune"),
        pytest.param(S.COMPLETE, C.FAIL, None, A.APPLY, S.FAIL, id="complete-relabel"),
        pytest.param(S.PRUNED, C.PRUNE, None, A.NOOP, None, id="already-there"),
        pytest.param(S.RUNNING, None, None, A.NOOP, None, id="no-command"),
        pytest.param(S.COMPLETE, None, UNDONE, A.NOOP, None, id="undone-stays"),
        pytest.param(S.FAIL, C.PRUNE, None, A.REFUSE, None, id="worker-failed-is-final"),
        pytest.param(S.PRUNED, C.FAIL, PRUNED_WHILE_RUNNING, A.REFUSE, None,
                     id="pruned-while-running-is-final"),
        pytest.param(S.PRUNED, None, RELABELLED_PRUNED, A.APPLY, S.COMPLETE, id="undo"),
        pytest.param(S.PRUNED, C.FAIL, RELABELLED_PRUNED, A.APPLY, S.FAIL,
                     id="relabel-switches-target"),
        pytest.param(S.PRUNED, None, RELABELLED_FAIL, A.NOOP, None,
                     id="history-of-another-state-is-not-ours"),
        pytest.param(S.PRUNED, None, PRUNED_WHILE_RUNNING, A.NOOP, None,
                     id="pruned-while-running-has-no-undo"),
    ],
)
def test_decide(
    state: S, command: C | None, last: LastChange | None, action: A, target: S | None
) -> None:
    d = decide(state, command, last, retroactive_allowed=True, retroactive_supported=True)
    assert (d.action, d.target) == (action, target)
    if action is A.APPLY:
        assert d.source is state


def test_relabel_and_undo_are_marked_retroactive() -> None:
    relabel = decide(S.COMPLETE, C.FAIL, None, retroactive_allowed=True, retroactive_supported=True)
    undo = decide(S.FAIL, None, RELABELLED_FAIL, retroactive_allowed=True,
                  retroactive_supported=True)
    assert relabel.retroactive and not relabel.undo
    assert undo.retroactive and undo.undo


def test_active_only_refuses_finished_trials_but_not_running_ones() -> None:
    d = decide(S.COMPLETE, C.FAIL, None, retroactive_allowed=False, retroactive_supported=True)
    assert d.action is A.REFUSE and "--active-only" in d.reason
    d = decide(S.RUNNING, C.FAIL, None, retroactive_allowed=False, retroactive_supported=True)
    assert d.action is A.APPLY


def test_journal_storage_refuses_relabels_saying_why() -> None:
    d = decide(S.COMPLETE, C.PRUNE, None, retroactive_allowed=True, retroactive_supported=False)
    assert d.action is A.REFUSE and "journal" in d.reason and "RDB" in d.reason
