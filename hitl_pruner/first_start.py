"""The first start on a database whose notes already carry commands: list, don't relabel.

The seed tool could not relabel finished trials, so its users' COMPLETE trials often have
notes saying PRUNE or FAIL that nobody meant as a relabel. On the first start on a database
(rdb.py ``_bootstrap``), every note already there is queued once, and the last queue id of
those notes is kept in ``hitl_meta`` (``existing_notes_upto``). The sweep's first round then
(sweep.py ``_hold``):

- applies the commands of RUNNING and WAITING trials, as the seed tool would have;
- lists, one log line each and a summary, the notes that would relabel a finished trial, and
  holds them back: each becomes an ``existing_note:<trial id>`` row of ``hitl_meta``, out of
  the queue, so they cost the sweep nothing;
- takes the rest (no command, nothing to do) off the queue as always, and drops the marker.

A later start says in one line how many notes are held. With ``--apply-existing-notes`` (on
the first start, or any later one) they are queued again and applied as any other note:
audited, undoable. A note written after the first start, or an old note saved again, is
applied as always. ``python -m hitl_pruner plan STORAGE_URL`` lists what the held notes (or,
before the first start, the database's notes) would change, and changes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Iterable

from optuna.trial import TrialState
import sqlalchemy as sa

from .applier import Applier
from .notes import note_ver_key
from .rdb import EXISTING_UPTO
from .rdb import SqlStore
from .rdb import attrs_t
from .rdb import changes_t
from .rdb import meta_t
from .store import NOTE_KEY
from .store import Note
from .store import TrialRef
from .transitions import ACTIVE
from .transitions import Action

logger = logging.getLogger("hitl_pruner")

HELD = "existing_note:"
FLAG = "--apply-existing-notes (HITL_APPLY_EXISTING_NOTES=1)"


@dataclasses.dataclass(frozen=True)
class Planned:
    """What an existing note would do to its trial."""

    ref: TrialRef
    note: Note
    command: str
    target: TrialState

    def line(self) -> str:
        return (
            f"study {self.ref.study_name!r} trial #{self.ref.number} (id {self.ref.trial_id}): "
            f"{self.ref.state.name} -> {self.target.name}: its note v{self.note.version} says "
            f"{self.command}"
        )


class ExistingNotes:
    """hitl_meta's record of the notes written before the first start, on one database:
    ``existing_notes_upto`` until the first start has sorted them (rdb.py writes it), then
    one ``existing_note:<trial id>`` row per note held back, ``<study id>:<note version>`` as
    the value (versions before 0.2 wrote the study id alone)."""

    def __init__(self, engine: sa.Engine, *, apply: bool) -> None:
        self.engine = engine
        self.apply = apply

    def upto(self) -> int:
        """The last queue id of the notes not sorted yet; 0 when the first start has been."""
        with self.engine.connect() as conn:
            value = conn.execute(
                sa.select(meta_t.c.value).where(meta_t.c.name == EXISTING_UPTO)
            ).scalar()
        return int(value) if value else 0

    def hold(self, held: Iterable[tuple[int, int, int]]) -> None:
        """Remember these (study id, trial id, note version) notes as held back: before their
        queue rows go, so that a crash in between loses none (a second try finds them
        remembered)."""
        rows = {f"{HELD}{tid}": f"{sid}:{version}" for sid, tid, version in held}
        if not rows:
            return
        with self.engine.begin() as conn:
            known = set(conn.execute(
                sa.select(meta_t.c.name).where(meta_t.c.name.in_(sorted(rows)))).scalars())
            new = [{"name": name, "value": sid} for name, sid in rows.items() if name not in known]
            if new:
                conn.execute(sa.insert(meta_t), new)

    def sorted_out(self) -> None:
        """The first start has sorted the old notes out: later starts only count the held."""
        with self.engine.begin() as conn:
            conn.execute(sa.delete(meta_t).where(meta_t.c.name == EXISTING_UPTO))

    def held(self, study_ids: set[int] | None = None, *,
             tidy: bool = False) -> list[tuple[int, int]]:
        """The (study id, trial id) of every note still held back. A note saved again since
        it was held is not: it was applied as any new note (``tidy`` deletes its row)."""
        with self.engine.connect() as conn:
            found: dict[int, tuple[int, int | None]] = {}
            for name, value in conn.execute(sa.select(meta_t.c.name, meta_t.c.value).where(
                    meta_t.c.name.like(f"{HELD}%"))):
                sid, _, version = value.partition(":")
                if study_ids is None or int(sid) in study_ids:
                    found[int(name[len(HELD):])] = (int(sid), int(version) if version else None)
            keys = {note_ver_key(tid): tid for tid, (_, v) in found.items() if v is not None}
            now: dict[int, object] = {}
            names = sorted(keys)
            for start in range(0, len(names), 500):
                for key, value in conn.execute(sa.select(attrs_t.c.key, attrs_t.c.value_json)
                                               .where(attrs_t.c.key.in_(names[start:start + 500]))):
                    now[keys[key]] = json.loads(value)
        saved_again = {tid for tid, (_, v) in found.items() if v is not None and now.get(tid) != v}
        if tidy and saved_again:
            with self.engine.begin() as conn:
                conn.execute(sa.delete(meta_t).where(
                    meta_t.c.name.in_([f"{HELD}{tid}" for tid in sorted(saved_again)])))
        return sorted((sid, tid) for tid, (sid, _) in found.items() if tid not in saved_again)

    def release(self, held: list[tuple[int, int]]) -> None:
        """Queue the held notes again, for the sweep to apply as any other."""
        if not held:
            return
        with self.engine.begin() as conn:
            conn.execute(sa.insert(changes_t), [
                {"study_id": sid, "attr_key": note_ver_key(tid)} for sid, tid in held
            ])
            conn.execute(sa.delete(meta_t).where(
                meta_t.c.name.in_([f"{HELD}{tid}" for _, tid in held])))


def would_relabel(applier: Applier, ref: TrialRef, note: Note) -> Planned | None:
    """What this note would do to its finished trial now, if it would change it."""
    command = applier.parser.parse(note.body)
    if command is None or ref.state in ACTIVE:
        return None
    decision = applier.preview(ref, command)
    if decision.action is not Action.APPLY or decision.target is None:
        return None
    return Planned(ref, note, command.value, decision.target)


def plan(applier: Applier, store: SqlStore) -> tuple[str, list[Planned]]:
    """What applying the notes written before the first start would change, and which notes
    those are: ("held", ...) the sweep holds them; ("first start", ...) hitl-pruner has not run
    here yet, so every note counts; ("none", []) nothing is held. Reads only."""
    engine = store.engine
    tables = set(sa.inspect(engine).get_table_names())
    if meta_t.name in tables:
        with engine.connect() as conn:
            bootstrapped = conn.execute(
                sa.select(meta_t.c.value).where(meta_t.c.name == "bootstrapped")
            ).first() is not None
    else:
        bootstrapped = False
    pairs: set[tuple[int, int]] = set()
    rows: list[tuple[int, str]]
    if not bootstrapped:
        kind = "first start"
        with engine.connect() as conn:
            rows = [tuple(r) for r in conn.execute(sa.select(
                attrs_t.c.study_id, attrs_t.c.key).where(attrs_t.c.key.like(
                    "dashboard:%:note_ver")))]
    else:
        existing = ExistingNotes(engine, apply=False)
        upto = existing.upto()
        kind = "held"
        if upto:  # started, but the first sweep has not sorted them out yet
            with engine.connect() as conn:
                rows = [tuple(r) for r in conn.execute(sa.select(
                    changes_t.c.study_id, changes_t.c.attr_key).where(changes_t.c.id <= upto))]
        else:
            rows = [(sid, note_ver_key(tid)) for sid, tid in existing.held()]
        if not rows:
            return "none", []
    for study_id, key in rows:
        match = NOTE_KEY.match(key)
        if match:
            pairs.add((study_id, int(match.group(1))))
    return kind, _planned(applier, store, pairs, history=bootstrapped)


def _planned(applier: Applier, store: SqlStore, pairs: Iterable[tuple[int, int]], *,
             history: bool) -> list[Planned]:
    by_study: dict[int, set[int]] = {}
    for study_id, trial_id in pairs:
        by_study.setdefault(study_id, set()).add(trial_id)
    refs = store.trials({tid for ids in by_study.values() for tid in ids})
    found: list[Planned] = []
    for study_id, trial_ids in sorted(by_study.items()):
        mine = {t: refs[t] for t in trial_ids if t in refs and refs[t].study_id == study_id}
        mine = {t: r for t, r in mine.items() if applier.monitors(r.study_name)}
        if not history:
            # No audit table yet, so no relabel of ours to look up: a trial PRUNED or FAIL
            # is its worker's verdict, which no note changes.
            mine = {t: r for t, r in mine.items() if r.state == TrialState.COMPLETE}
        notes = store.notes(study_id, mine) if mine else {}
        for tid, ref in sorted(mine.items(), key=lambda item: item[1].number):
            note = notes.get(tid)
            planned = would_relabel(applier, ref, note) if note is not None else None
            if planned is not None:
                found.append(planned)
    return found
