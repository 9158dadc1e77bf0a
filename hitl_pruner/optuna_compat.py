"""Where the Optuna releases we support (4.0 to 5.0) differ, in one place."""

from __future__ import annotations

import optuna


def is_finished_trial_error(error: BaseException) -> bool:
    """Whether ``error`` is a storage refusing to update a trial that has finished already.

    Later releases raise ``optuna.exceptions.UpdateFinishedTrialError``; Optuna 4.0 raises a
    plain ``RuntimeError`` with the same message, told apart by that message, so any other
    RuntimeError still propagates.
    """
    finished = getattr(optuna.exceptions, "UpdateFinishedTrialError", None)
    if finished is not None:
        return isinstance(error, finished)
    return isinstance(error, RuntimeError) and "has already finished and can not be updated" in str(
        error
    )


def _release(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


# Optuna 4.0 to 4.4: after telling a trial PRUNED, study.optimize reads the trial back and, when
# it is stored as FAIL (a human's FAIL request: the server's trigger stores PRUNED as FAIL),
# raises the objective's TrialPruned out of optimize unless ``catch`` holds it. Optuna 4.5
# judges by the state it told instead (optuna PR #6133); fail_tell.py answers that read as told.
OPTIMIZE_RAISES_AFTER_A_FAIL_REQUEST = _release(optuna.__version__) < (4, 5)
