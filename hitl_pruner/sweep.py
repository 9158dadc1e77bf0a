"""The background sweep: applies commands in notes that did not come through our note-save,
and settles the requests to cooperative workers (forcing those past their grace period)."""

from __future__ import annotations

import collections
import dataclasses
import datetime
import logging
import os
import threading
import time
from typing import TYPE_CHECKING
from typing import Callable

from . import outage
from .applier import Applier
from .lock import SweepLock
from .store import Change
from .store import Note
from .store import Store
from .store import TrialRef
from .study_stop import StudyStops
from .transitions import ACTIVE
from .wake import Watch

if TYPE_CHECKING:
    from .first_start import ExistingNotes

logger = logging.getLogger(__name__)

BATCH = 1000
_FLAG = "--apply-existing-notes (HITL_APPLY_EXISTING_NOTES=1)"
# After a bug (not an outage), wait longer each time, up to this, so as not to flood the log.
MAX_BACKOFF = 300.0
# The longest a watch blocks at a time, so that stop() is heard that soon.
WATCH_SLICE = 0.25
# A woken sweep waits this long before it reads the queue. A note saved through our note-save
# is then applied by its own request, which answers the human with what happened and takes it
# off the queue; the sweep is for notes written any other way. The wait also lets the
# dashboard's second write of a note (its text, after its version) land, and gathers a burst
# of notes from a script into one batch. A script's note is still applied in about 0.3 s
# (half of wake.POLL_EVERY, this, and the batch's own time).
WAKE_SETTLE = 0.15


@dataclasses.dataclass
class SweepStats:
    changes: int = 0
    trials: int = 0
    applied: int = 0
    # Open requests to workers looked at, and those closed (by the worker, or forced).
    requests: int = 0
    settled: int = 0
    seconds: float = 0.0


class Sweeper:
    """Runs ``run_once`` every interval in a thread, while this process holds the sweep lock.

    Without a lock every process sweeps. With one (lock.py), the thread of every process keeps
    looping, but only the holder sweeps; the others try to take the lock each interval. The
    lock is taken by the loop, not by ``run_once``, which stays callable directly.

    Between rounds the holder waits on its ``watch`` (wake.py), when it has one: as soon as a
    note is written it checks the lock and runs the queue part of a round (``run_queue``), so a
    note written by a script is applied within a fraction of a second. The interval stays the
    pace of the rest: settling requests to workers, the lock's hand-over, outage retries.

    While the database is unavailable (outage.py) the loop tries again every interval, first
    with ``ping``, and sweeps in the round the database answers again, so queued commands wait
    at most one interval after it is back. The outage is logged once by ``state``, not per round.
    Any other error is a bug: logged with its traceback, and retried after a growing pause.
    """

    def __init__(
        self,
        applier: Applier,
        store: Store,
        *,
        interval: float,
        lock: SweepLock | None = None,
        state: outage.DatabaseState | None = None,
        ping: Callable[[], object] | None = None,
        watch: Watch | None = None,
        existing: ExistingNotes | None = None,
    ) -> None:
        self.applier = applier
        # The notes written before the first start on an RDB database (first_start.py); its
        # state is read on this process's first round, then kept in _skip.
        self.existing = existing
        self._skip: int | None = None
        self.store = store
        self.interval = interval
        self.lock = lock
        self.state = state if state is not None else outage.DatabaseState()
        self.ping = ping
        self.watch = watch
        # STOP in a study's note, written any other way than through our note-save.
        self.stops = StudyStops(applier)
        self.last_run: float | None = None
        # When the loop last went round (swept, or tried for the lock), and its failures since.
        self.last_tick: float | None = None
        self.failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # In a dry run nothing is consumed, so the same notes come back every sweep: say once.
        # Keyed by the text too: the dashboard writes a note's version before its text, and a
        # sweep woken by the first write reads the new version with the old text.
        self._dry_run_said: set[tuple[int, int, str]] = set()

    def run_once(self) -> SweepStats:
        """A whole round: the queue, then the open requests to workers."""
        return self._run(settle=True)

    def run_queue(self) -> SweepStats:
        """The queue part of a round only: what a watch's wake runs."""
        return self._run(settle=False)

    def _run(self, *, settle: bool) -> SweepStats:
        started = time.perf_counter()
        stats = SweepStats()
        names = self.applier.studies
        study_ids = self.store.study_ids(names) if names else None
        after = self._existing_notes(study_ids, stats) if self.existing is not None else 0
        while True:
            changes = self.store.pending(study_ids, BATCH, after=after)
            if changes:
                after = changes[-1].id
            stats.changes += len(changes)
            done = self._apply(changes, stats)
            stats.applied += self.stops.sweep(changes, full=False)
            if self.applier.dry_run:
                break
            self.store.ack(done)
            if len(changes) < BATCH:
                break
        if settle:
            stats.applied += self.stops.sweep([], full=True)  # a store without a queue
            self._settle(study_ids, stats)
        stats.seconds = time.perf_counter() - started
        self.last_run = time.time()
        if stats.changes or stats.settled:
            logger.debug("sweep: %s", stats)
        return stats

    def _settle(self, study_ids: set[int] | None, stats: SweepStats) -> None:
        """Close requests whose worker answered; force those still running past the deadline."""
        now = datetime.datetime.now(datetime.timezone.utc)
        for request, state in self.store.requests(study_ids):
            stats.requests += 1
            outcome = self.applier.settle(request, state, now)
            if outcome.action in ("applied", "dropped"):
                stats.settled += 1

    def _apply(self, changes: list[Change], stats: SweepStats) -> list[Change]:
        """Apply the current note of every trial named; return the changes that are settled.

        In a few statements whatever the number of notes: the trials in one query, the notes
        in one per study, and the applier's batch (``Applier.apply_many``).
        """
        by_study: dict[int, set[int]] = collections.defaultdict(set)
        for change in changes:
            if change.trial_id >= 0:
                by_study[change.study_id].add(change.trial_id)
        refs = self.store.trials({tid for ids in by_study.values() for tid in ids})
        items: list[tuple[TrialRef, Note]] = []
        for study_id, trial_ids in by_study.items():
            # A note filed under another study's id names a trial that is not this study's.
            mine = {tid: refs[tid] for tid in trial_ids
                    if tid in refs and refs[tid].study_id == study_id}
            notes = self.store.notes(study_id, mine) if mine else {}
            for tid, ref in mine.items():
                note = notes.get(tid)
                if note is None:
                    continue
                if self.applier.dry_run:
                    if (tid, note.version, note.body) in self._dry_run_said:
                        continue
                    self._dry_run_said.add((tid, note.version, note.body))
                items.append((ref, note))
        unsettled: set[int] = set()
        for (ref, _), outcome in zip(items, self.applier.apply_many(items)):
            stats.trials += 1
            if outcome.action == "applied":
                stats.applied += 1
            elif outcome.action == "lost race":
                unsettled.add(ref.trial_id)
        return [c for c in changes if c.trial_id not in unsettled]

    def _existing_notes(self, study_ids: set[int] | None, stats: SweepStats) -> int:
        """Sort out the notes written before the first start, on this process's first round;
        returns the queue id the round reads after (0 but in a dry run's first start).

        On the first start: apply the old notes of running trials, and list and hold back
        those that would relabel a finished trial (``_hold``). On a later start, say in one
        line how many are held. With --apply-existing-notes, queue the held notes again (on
        the first start, leave them queued), to be applied as any other.
        """
        existing = self.existing
        assert existing is not None
        if self._skip is not None:
            return self._skip
        dry_run = self.applier.dry_run
        upto = existing.upto()
        self._skip = upto if upto and dry_run else 0  # a dry run leaves them queued
        if upto and not existing.apply:
            self._hold(upto, stats)
            return self._skip
        if upto:
            logger.warning("first start: applying the notes written before hitl-pruner first "
                           "ran on this database, finished trials' too (--apply-existing-notes)")
            if not dry_run:
                existing.sorted_out()
            return self._skip
        held = existing.held(study_ids, tidy=not dry_run)
        if held and existing.apply and not dry_run:
            existing.release(held)
            logger.warning("applying the %d notes held back since the first start "
                           "(--apply-existing-notes)", len(held))
        elif held:
            logger.warning(
                "%d notes written before hitl-pruner first ran on this database would relabel "
                "finished trials and are held back (listed at the first start; `python -m "
                "hitl_pruner plan STORAGE_URL` lists them); %s applies them", len(held), _FLAG)
        return self._skip

    def _hold(self, upto: int, stats: SweepStats) -> None:
        """The first start: apply the old notes of running trials, list those that would
        relabel a finished trial and hold them back (hitl_meta), take the rest off the queue.
        All studies' notes, so that none is applied later by a server with other --study."""
        from .first_start import would_relabel

        existing = self.existing
        assert existing is not None
        held: list[tuple[int, int, int]] = []
        after = 0
        while True:
            changes = [c for c in self.store.pending(None, BATCH, after=after) if c.id <= upto]
            if not changes:
                break
            after = changes[-1].id
            first = len(held)  # this page's held notes start here
            stats.changes += len(changes)
            refs = self.store.trials({c.trial_id for c in changes if c.trial_id >= 0})
            mine = {c.trial_id: refs[c.trial_id] for c in changes if c.trial_id in refs
                    and refs[c.trial_id].study_id == c.study_id}
            active = [c for c in changes if c.trial_id in mine and mine[c.trial_id].state in ACTIVE]
            run = [c for c in active if self.applier.monitors(mine[c.trial_id].study_name)]
            for study_id in {ref.study_id for ref in mine.values()}:
                finished = {t: r for t, r in mine.items()
                            if r.study_id == study_id and r.state not in ACTIVE}
                notes = self.store.notes(study_id, finished) if finished else {}
                stats.trials += len(notes)
                for tid, note in sorted(notes.items()):
                    planned = would_relabel(self.applier, finished[tid], note)
                    if planned is not None:
                        held.append((study_id, tid, note.version))
                        logger.info("first start: not applied: %s (%s applies it)",
                                    planned.line(), _FLAG)
            done = {c.id for c in self._apply(run, stats)}
            # A study's note written since our triggers exist (bootstrap queues none).
            stats.applied += self.stops.sweep(changes, full=False)
            if not self.applier.dry_run:
                existing.hold(held[first:])
                # The held notes move to hitl_meta. Left queued: a running trial's note the
                # round did not settle, or of a study outside --study (for its server).
                self.store.ack([c for c in changes if c.id in done or c not in active])
        if held:
            logger.warning(
                "first start: %d notes written before hitl-pruner first ran on this database "
                "would relabel finished trials (listed above); none was applied. To apply "
                "them, start once with %s; `python -m hitl_pruner plan STORAGE_URL` lists "
                "them again. New notes, and old ones saved again, are applied as always.",
                len(held), _FLAG)
        if not self.applier.dry_run:
            existing.sorted_out()

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="hitl-sweep", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def active(self) -> bool:
        """Whether this process runs the sweep (holds the lock, or there is none)."""
        return self.alive and (self.lock is None or self.lock.held)

    def _my_turn(self) -> bool:
        lock = self.lock
        if lock is None:
            return True
        if lock.held:
            if lock.check():
                return True
            logger.warning("this process no longer runs the sweep (pid %d)", os.getpid())
        if lock.try_acquire():
            logger.info("this process now runs the sweep (pid %d)", os.getpid())
            return True
        return False

    def _round(self) -> None:
        """One turn of the loop: after an outage, ping first; sweep if it is our turn."""
        if self.state.down and self.ping is not None:
            outage.retry_stale(self.ping)  # raises while the database is still away
            self.state.answered()
        # After a quick restart the lock's connection is the first to fail, which makes the
        # pool drop its connections too, so the sweep that follows gets new ones.
        if self._my_turn():
            self.run_once()
        self.state.answered()

    def _loop(self) -> None:
        delay = 0.0  # first sweep at once: it picks up notes saved while we were down
        try:
            while not self._wait(delay):
                try:
                    self._round()
                    self.failures = 0
                    delay = self.interval
                except Exception as exc:
                    delay = self._failed(exc, delay)
                self.last_tick = time.time()
        finally:
            if self.watch is not None:
                self.watch.close()
            if self.lock is not None and self.lock.held:
                self.lock.release()
                logger.info("this process stopped running the sweep (pid %d)", os.getpid())

    def _failed(self, exc: Exception, delay: float) -> float:
        """Count and log a failed round; the pause before the next one."""
        self.failures += 1
        if outage.unavailable(exc):
            # An outage ends the sweep neither, nor slows it: the queue waits for the
            # database, and is applied in the round the database answers.
            self.state.failed(exc)
            return self.interval
        delay = min(max(delay * 2, self.interval), MAX_BACKOFF)
        logger.exception("sweep failed; retrying in %.0f s", delay)
        return delay

    def _wait(self, delay: float) -> bool:
        """Pause ``delay`` seconds before the next round; True once stopped.

        The sweeping process watches meanwhile, and applies the queue at each wake. A process
        that does not sweep, or whose last round failed, only waits: its next round is the
        one that takes the lock or meets the outage.
        """
        watch = self.watch
        if watch is None or self.failures or (self.lock is not None and not self.lock.held):
            return self._stop.wait(delay)
        until = time.monotonic() + delay
        while not self._stop.is_set():
            left = until - time.monotonic()
            if left <= 0:
                return False
            try:
                if watch.wait(min(left, WATCH_SLICE)) and not self._stop.is_set():
                    if not self._wake():
                        return False  # the lock was lost: the next round sees to it now
            except Exception as exc:
                # As a failed round: an outage or a bug; the next round comes at the interval.
                self._failed(exc, 0.0)
                return self._stop.wait(max(0.0, until - time.monotonic()))
        return True

    def _wake(self) -> bool:
        """A note was written: apply the queue now. False when the lock is no longer ours."""
        lock = self.lock
        if self._stop.wait(WAKE_SETTLE):
            return True
        if lock is not None and not lock.check():
            logger.warning("this process no longer runs the sweep (pid %d)", os.getpid())
            return False
        self.run_queue()
        return True
