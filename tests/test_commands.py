from __future__ import annotations

import pytest

from hitl_pruner.commands import Command
from hitl_pruner.commands import CommandParser
from hitl_pruner.commands import PatternError


@pytest.mark.parametrize(
    "note, expected",
    [
        pytest.param("PRUNE", Command.PRUNE, id="prune"),
        pytest.param("FAIL", Command.FAIL, id="fail"),
        pytest.param("loss diverges.\nPRUNE please", Command.PRUNE, id="prune-in-prose"),
        pytest.param("**FAIL**: bogus split", Command.FAIL, id="fail-in-markdown"),
        pytest.param("", None, id="empty"),
        pytest.param("does not fail", None, id="lower-case-fail-is-prose"),
        pytest.param("pruned layers 3-5", None, id="pruned-is-prose"),
        pytest.param("Failure analysis below", None, id="failure-is-prose"),
        pytest.param("PRUNED already", None, id="pruned-upper-is-not-prune"),
        pytest.param("FAILED run", None, id="failed-upper-is-not-fail"),
        pytest.param("Prune", None, id="capitalised-is-prose"),
        pytest.param("PRUNE\nlater: FAIL", Command.FAIL, id="fail-written-last-wins"),
        pytest.param("FAIL\nno, PRUNE", Command.PRUNE, id="prune-written-last-wins"),
    ],
)
def test_default_patterns_take_whole_upper_case_words(note: str, expected: Command | None) -> None:
    assert CommandParser().parse(note) is expected


def test_custom_patterns_replace_the_defaults() -> None:
    parser = CommandParser(r"(?i)\bstop\b", r"#fail")
    assert parser.parse("please STOP this") is Command.PRUNE
    assert parser.parse("#fail") is Command.FAIL
    assert parser.parse("PRUNE") is None


def test_patterns_matching_the_same_text_resolve_to_fail() -> None:
    assert CommandParser("X", "X").parse("X") is Command.FAIL


def test_an_invalid_pattern_is_refused_naming_the_flag() -> None:
    with pytest.raises(PatternError, match=r"--prune-pattern '\(' is not a valid regular"):
        CommandParser("(")


def test_commands_target_optuna_states() -> None:
    from optuna.trial import TrialState

    assert Command.PRUNE.target is TrialState.PRUNED
    assert Command.FAIL.target is TrialState.FAIL
