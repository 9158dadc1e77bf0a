"""Prune, fail or undo trials from a script: a note saved per trial, applied as a dashboard save.

``prune``/``fail`` append the command word to each trial's note (the reason, if any, on the
line before it), ``undo`` takes the command words out; each saves the note's next version as
the dashboard's note API does, then hands it to the server's own applier (app.build_applier):
the same allow-list, refusals, retroactive and dry-run rules, grace and study filter, an audit
row with source "cli" and the user. The core takes arguments only; cli.py reads the
environment and the command line.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
from typing import Any
from typing import Iterable
from typing import Mapping
from typing import Sequence

from optuna.storages import BaseStorage
from optuna.trial import TrialState

from . import dashboard
from .applier import Applier
from .applier import Outcome
from .audit import CLI
from .commands import Command
from .config import ConfigError
from .config import Settings
from .store import Note
from .store import TrialRef

logger = logging.getLogger("hitl_pruner")

# The outcomes after which a script has what it asked for (exit code 0).
SUCCEEDED = frozenset(("applied", "requested", "nothing to do", "dry run"))


class UsageError(ConfigError):
    """The study or trials named do not exist (or cannot be read): nothing was changed."""


@dataclasses.dataclass(frozen=True)
class TrialResult:
    """What became of one trial: the applier's outcome, as the dashboard's toast shows it."""

    number: int
    trial_id: int
    action: str
    reason: str
    from_state: TrialState | None = None
    to_state: TrialState | None = None
    note_version: int | None = None

    @property
    def ok(self) -> bool:
        return self.action in SUCCEEDED

    def to_json(self) -> dict[str, object]:
        return {
            "number": self.number,
            "trial_id": self.trial_id,
            "action": self.action,
            "reason": self.reason,
            "from": self.from_state.name if self.from_state is not None else None,
            "to": self.to_state.name if self.to_state is not None else None,
            "note_version": self.note_version,
        }

    def line(self) -> str:
        change = (
            f"{self.from_state.name} -> {self.to_state.name}"
            if self.from_state is not None and self.to_state is not None else "-"
        )
        return f"trial {self.number}: {change}: {self.action}: {self.reason}"


def parse_trials(specs: Iterable[str | int]) -> list[int]:
    """Trial numbers from ``3``, ``"5"``, ``"7-9"`` (inclusive), in order, without repeats."""
    numbers: list[int] = []
    for spec in specs:
        text = str(spec).strip()
        first, dash, last = text.partition("-")
        try:
            if not (first.isascii() and first.isdigit()) or (
                dash and not (last.isascii() and last.isdigit())
            ):
                raise ValueError
            low, high = int(first), int(last) if dash else int(first)
        except ValueError:
            raise UsageError(
                f"--trials: {text!r} is not a trial number or a range like 7-9"
            ) from None
        if high < low:
            raise UsageError(f"--trials: the range {text!r} runs backwards; write {high}-{low}")
        numbers.extend(range(low, high + 1))
    if not numbers:
        raise UsageError("--trials: name at least one trial number")
    return list(dict.fromkeys(numbers))


def prune(storage: BaseStorage | str, study_name: str, trials: Iterable[str | int], *,
          reason: str | None = None, user: str | None = None, dry_run: bool = False,
          **options: Any) -> list[TrialResult]:
    """End these trials (by number) as PRUNED, or relabel finished ones: one result each.

    ``options`` are the server's settings (Settings fields: ``allowed_users``,
    ``retroactive``, ``grace``, ``studies``, ``prune_pattern`` ...). Raises UsageError, changing
    nothing, for an unknown study or trial number.
    """
    return run(storage, study_name, trials, Command.PRUNE, reason=reason, user=user,
               dry_run=dry_run, **options)


def fail(storage: BaseStorage | str, study_name: str, trials: Iterable[str | int], *,
         reason: str | None = None, user: str | None = None, dry_run: bool = False,
         **options: Any) -> list[TrialResult]:
    """As :func:`prune`, to FAIL."""
    return run(storage, study_name, trials, Command.FAIL, reason=reason, user=user,
               dry_run=dry_run, **options)


def undo(storage: BaseStorage | str, study_name: str, trials: Iterable[str | int], *,
         user: str | None = None, dry_run: bool = False, **options: Any) -> list[TrialResult]:
    """Take the command words out of these trials' notes, as the dashboard's Undo does: a
    relabelled trial goes back to COMPLETE."""
    return run(storage, study_name, trials, None, user=user, dry_run=dry_run, **options)


def run(storage: BaseStorage | str, study_name: str, trials: Iterable[str | int],
        command: Command | None, *, reason: str | None = None, user: str | None = None,
        dry_run: bool = False, **options: Any) -> list[TrialResult]:
    """Carry out ``command`` (None: undo) on each trial; see :func:`prune`."""
    from .app import build_applier
    from .app import open_storage
    from .app import open_store

    if reason is not None and "\n" in reason.strip():
        raise UsageError("--reason: one line of text")
    numbers = parse_trials(trials)
    url = storage if isinstance(storage, str) else options.pop("storage_url", "")
    try:
        settings = Settings(storage_url=url, dry_run=dry_run, **options)
    except TypeError as exc:
        raise UsageError(f"unknown option: {exc}") from None
    if isinstance(storage, str):
        storage = open_storage(settings)
    store = open_store(storage)
    applier = build_applier(settings, storage, store)
    study_id = _study_id(storage, study_name)
    if not applier.monitors(study_name):
        raise UsageError(
            f"study {study_name!r} is outside the studies this server watches "
            f"({', '.join(settings.studies)}; --study / HITL_STUDY of serve)"
        )
    ids = _trial_ids(storage, study_id, study_name, numbers)
    return act(storage, applier, ids, command, reason=reason, user=user, source=CLI)


def act(storage: BaseStorage, applier: Applier, ids: Mapping[int, int], command: Command | None,
        *, reason: str | None, user: str | None, source: str,
        dry_run: bool = False) -> list[TrialResult]:
    """Carry out ``command`` (None: undo) on trials given as {number: trial_id}: each trial's
    note gets its next version, saved and applied as one note save; one result each, in order.

    The core of :func:`run` and of the dashboard's bulk action (bulk.py). The trials and their
    notes are read in one go; each note is still saved as its own compare-and-set, and on an
    RDB storage with its change and audit row in the same transaction (Applier.save).
    ``dry_run``: save nothing, say what each note would do (as a server in --dry-run).
    """
    if dry_run and not applier.dry_run:
        # The same applier, rules and all, but one that only says what it would do.
        applier = copy.copy(applier)
        applier.dry_run = True
    refs = applier.store.trials(ids.values())
    notes: dict[int, Note] = {}
    for study_id in {ref.study_id for ref in refs.values()}:
        notes.update(applier.store.notes(
            study_id, [r.trial_id for r in refs.values() if r.study_id == study_id]))
    if applier.saves_notes and len({ref.study_id for ref in refs.values()}) == 1:
        return _many(applier, ids, refs, notes, command, reason=reason, user=user,
                     source=source)
    results = []
    for number, trial_id in ids.items():
        ref = refs.get(trial_id)
        if ref is None:  # deleted since we looked: nothing to change
            results.append(TrialResult(number, trial_id, "nothing to do", "the trial is gone"))
            continue
        results.append(_one(storage, applier, ref, notes.get(trial_id, Note(0, "")), command,
                            reason=reason, user=user, source=source))
    return results


def _many(applier: Applier, ids: Mapping[int, int], refs: Mapping[int, TrialRef],
          notes: Mapping[int, Note], command: Command | None, *, reason: str | None,
          user: str | None, source: str) -> list[TrialResult]:
    """``_one`` for every trial, the notes saved in one go (Applier.save_many)."""
    done: dict[int, TrialResult] = {}
    saving: list[tuple[TrialRef, Note]] = []
    for trial_id in ids.values():  # in the caller's order, as the audit rows are written
        ref = refs.get(trial_id)
        if ref is None:
            continue
        edited = _edited(applier, ref, notes.get(trial_id, Note(0, "")), command, reason)
        if isinstance(edited, Outcome):
            done[trial_id] = _result(ref, edited)
            continue
        if not applier.dry_run:
            applier.before_save(ref, edited, user=user)
        saving.append((ref, edited))
    for (ref, saved), outcome in zip(saving, applier.save_many(saving, user=user, source=source)):
        version = None if applier.dry_run else saved.version
        if isinstance(outcome, Note):
            done[ref.trial_id] = _result(ref, Outcome(
                "conflict", "the note changed while we wrote it; nothing saved, run again",
                ref.trial_id))
        elif isinstance(outcome, Outcome):
            done[ref.trial_id] = _result(ref, outcome, version)
        else:  # saved alone, or outside --study: applied as after any save
            done[ref.trial_id] = _applied(applier, ref, saved, source=source, user=user)
    return [
        done[trial_id] if trial_id in done
        else TrialResult(number, trial_id, "nothing to do", "the trial is gone")
        for number, trial_id in ids.items()
    ]


def _edited(applier: Applier, ref: TrialRef, note: Note, command: Command | None,
            reason: str | None) -> Note | Outcome:
    """The note's next version carrying the command (None: without command words), or why
    there is nothing to save."""
    if command is None:
        body = applier.parser.strip(note.body)
        if body == note.body:
            return Outcome("nothing to do",
                           "the note has no PRUNE or FAIL to take out; nothing saved",
                           ref.trial_id)
    else:
        body = with_command(note.body, command.value, reason)
        if applier.parser.parse(body) is not command:
            return Outcome(
                "refused",
                f"the configured patterns do not read {command.value!r} as {command.value}",
                ref.trial_id,
            )
    return Note(note.version + 1, body)


def _applied(applier: Applier, ref: TrialRef, saved: Note, *, source: str,
             user: str | None) -> TrialResult:
    try:
        outcome = applier.apply(ref, saved, source=source, user=user)
    except Exception as exc:
        # The note is saved and queued, as after a dashboard save: the sweep applies it.
        logger.exception("applying the note of trial #%d failed", ref.number)
        return _result(ref, Outcome("error", f"saved; a running server applies it ({exc})",
                                    ref.trial_id), saved.version)
    return _result(ref, outcome, None if applier.dry_run else saved.version)


def _one(storage: BaseStorage, applier: Applier, ref: TrialRef, note: Note,
         command: Command | None, *, reason: str | None, user: str | None,
         source: str) -> TrialResult:
    saved = _edited(applier, ref, note, command, reason)
    if isinstance(saved, Outcome):
        return _result(ref, saved)
    conflict = Outcome("conflict", "the note changed while we wrote it; nothing saved, run again",
                       ref.trial_id)
    if not applier.dry_run:
        # As the note-save does: a refused user's note is remembered before it is saved, so no
        # sweep applies it meanwhile.
        applier.before_save(ref, saved, user=user)
        if applier.saves_notes:
            # As a note saved in the dashboard: one transaction with the change it forces.
            done = applier.save(ref, saved, user=user, source=source)
            if isinstance(done, Note):
                return _result(ref, conflict)
            if isinstance(done, Outcome):
                return _result(ref, done, saved.version)
        elif not dashboard.save_note(storage, ref.study_id, ref.trial_id, saved.version,
                                     saved.body):
            return _result(ref, conflict)
    return _applied(applier, ref, saved, source=source, user=user)


def with_command(body: str, word: str, reason: str | None) -> str:
    """The note with ``word`` appended on a line of its own, as the dashboard's buttons do; the
    reason goes on the line before it, so the word stays last and standing alone."""
    kept = body.rstrip()
    added = f"{reason.strip()}\n{word}" if reason and reason.strip() else word
    return f"{kept}\n\n{added}" if kept else added


def _result(ref: TrialRef, outcome: Outcome, version: int | None = None) -> TrialResult:
    return TrialResult(ref.number, ref.trial_id, outcome.action, outcome.reason,
                       outcome.from_state, outcome.to_state, version)


def _study_id(storage: BaseStorage, name: str) -> int:
    try:
        return storage.get_study_id_from_name(name)
    except KeyError:
        pass
    names = [s.study_name for s in storage.get_all_studies()]
    close = difflib.get_close_matches(name, names, n=5)
    if close:
        hint = f"did you mean {', '.join(map(repr, close))}?"
    elif names:
        hint = f"its studies: {', '.join(map(repr, sorted(names)[:20]))}" + (
            " ..." if len(names) > 20 else "")
    else:
        hint = "it has no studies"
    raise UsageError(
        f"no study named {name!r} in this storage; {hint} (list them with "
        "`optuna studies --storage URL`)"
    )


def _trial_ids(storage: BaseStorage, study_id: int, study_name: str,
               numbers: Sequence[int]) -> dict[int, int]:
    """Trial ids by number; every number is checked before anything changes."""
    ids: dict[int, int] = {}
    unknown = []
    for number in numbers:
        try:
            ids[number] = storage.get_trial_id_from_study_id_trial_number(study_id, number)
        except KeyError:
            unknown.append(number)
    if unknown:
        shown = ", ".join(map(str, unknown[:20])) + (" ..." if len(unknown) > 20 else "")
        raise UsageError(
            f"study {study_name!r} has no trial numbered {shown}; nothing was changed"
        )
    return ids
