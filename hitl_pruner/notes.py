"""How optuna-dashboard keeps a note: in the study's system attrs, a version under one key and the
text cut into chunks under numbered keys; the trial id in each key, none for the study's note.

The same as optuna_dashboard._note, written here so that what reads and writes notes (the worker
side, the sweep, the stores) does not import optuna-dashboard, bottle and what they import: about
0.3 s of CPU at the start of every Optuna worker process that imports hitl_pruner. The server side
gets these through dashboard.py with the rest of the dashboard's internals, and
tests/test_dashboard_internals.py checks them against the installed dashboard's own.
"""

from __future__ import annotations

# The longest text one system attr holds (its SYSTEM_ATTR_MAX_LENGTH).
CHUNK = 2045


def note_ver_key(trial_id: int | None) -> str:
    """The key of a note's version: ``dashboard:<trial_id>:note_ver``; the study's without id."""
    return "dashboard:note_ver" if trial_id is None else f"dashboard:{trial_id}:note_ver"


def note_str_key_prefix(trial_id: int | None) -> str:
    """The keys of a note's text are this prefix and the chunk's number from 0."""
    return "dashboard:note_str:" if trial_id is None else f"dashboard:{trial_id}:note_str:"


def split_body(body: str, trial_id: int | None) -> dict[str, str]:
    """The text's chunks by key, as the dashboard writes them (none for an empty text)."""
    prefix = note_str_key_prefix(trial_id)
    return {f"{prefix}{i}": body[start:start + CHUNK]
            for i, start in enumerate(range(0, len(body), CHUNK))}
