"""Tell a webhook when a human acts: one JSON POST per audit row, off the request path.

``Notifier(url)`` keeps a bounded queue and one background thread per process. ``send``
only appends to the queue (a lock and a deque: microseconds), so a receiver that is slow or
down never slows the note save, the sweep or a script; the audit row is written before
``send`` is called, so delivery can fail without losing anything the audit holds.

The thread POSTs each message, in order, with a timeout; a connection error, a timeout, a 429
or a 5xx is retried with a doubling pause (``Retry-After`` honoured, capped), up to
``attempts`` tries, then given up with a log line. Another 4xx is given up at once: the
receiver refuses the message itself. When the queue is full the oldest message is dropped:
the newest say most about the present. Drops and give-ups are logged and counted
(``stats()``).

The body is what Slack's incoming webhooks take (``{"text": ...}``), plus the audit row under
``"hitl_pruner"`` for receivers that read fields; Slack ignores the extra key.

Threads do not survive ``fork()``: the thread starts on the first message in each process
(an ``os.getpid()`` guard), and a forked child drops the copy of its parent's queue (the
parent sends those). ``flush(timeout)`` waits, bounded, for the queue to empty; an ``atexit``
hook does so for a short while, so a CLI that exits right after acting still delivers.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import json
import logging
import os
import threading
import time
from typing import Callable
from typing import Iterable
import urllib.error
import urllib.parse
import urllib.request

from .audit import AuditEntry
from .audit import actor

logger = logging.getLogger("hitl_pruner")

QUEUE_SIZE = 1000
ATTEMPTS = 5
TIMEOUT = 5.0  # seconds for one POST, connect and answer
FIRST_PAUSE = 0.5  # before the first retry; doubles each time
MAX_PAUSE = 30.0
# At interpreter exit (a CLI that acted), the longest we wait for the queue to empty.
EXIT_FLUSH = 3.0
# A full queue logs its drops at most this often, with the count so far.
DROP_LOG_EVERY = 10.0

# One POST: (url, body, timeout) -> (HTTP status, Retry-After); OSError when no answer came.
Post = Callable[[str, bytes, float], tuple[int, str | None]]


def check_url(url: str) -> str:
    """The URL if it can receive our POSTs; ValueError saying what is wrong otherwise."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is no number
    except ValueError as exc:
        raise ValueError(f"{redact(url)!r} is not a URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(
            f"{redact(url)!r} is not an http:// or https:// URL; give e.g. "
            "https://hooks.slack.com/services/..."
        )
    if not parts.hostname:
        raise ValueError(f"{redact(url)!r} names no host")
    return url


def redact(url: str) -> str:
    """The URL as our logs show it: scheme and host only (a webhook's path is its secret)."""
    try:
        parts = urllib.parse.urlsplit(url)
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/..." if parts.netloc else "?"
    except ValueError:
        return "?"


def _slack_escape(text: str) -> str:
    # Slack reads <...> as links and mentions (<!channel>); a study name must not ping anyone.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def message(entry: AuditEntry) -> dict[str, object]:
    """The JSON body for one audit row: Slack's ``text``, and the row itself."""
    who = actor(entry.source, entry.user, entry.note_version)
    if entry.study_level:  # a study stopped or resumed (study_stop.py)
        return {"text": _slack_escape(f"hitl-pruner: {entry.describe()}"),
                "hitl_pruner": entry.to_json()}
    kind = " (undo)" if entry.undo else " (retroactive relabel)" if entry.retroactive else ""
    text = (
        f"hitl-pruner: study {entry.study_name!r} trial #{entry.trial_number}: "
        f"{entry.from_state.name} \u2192 {entry.to_state.name}{kind}, by {who}"
    )
    return {"text": _slack_escape(text), "hitl_pruner": entry.to_json()}


def _post(url: str, body: bytes, timeout: float) -> tuple[int, str | None]:
    request = urllib.request.Request(
        url, data=body, method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "hitl-pruner"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - http(s) only
            response.read(65536)
            return response.status, None
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code, exc.headers.get("Retry-After") if exc.headers else None


@dataclasses.dataclass
class Stats:
    queued: int = 0  # waiting now
    sent: int = 0
    retries: int = 0
    failed: int = 0  # given up after the last attempt, or refused with a 4xx
    dropped: int = 0  # the queue was full


class Notifier:
    """A bounded queue of messages for ``url`` and the thread that POSTs them."""

    def __init__(
        self,
        url: str,
        *,
        queue_size: int = QUEUE_SIZE,
        attempts: int = ATTEMPTS,
        timeout: float = TIMEOUT,
        first_pause: float = FIRST_PAUSE,
        max_pause: float = MAX_PAUSE,
        post: Post = _post,
    ) -> None:
        self.url = check_url(url)
        self.queue_size = queue_size
        self.attempts = attempts
        self.timeout = timeout
        self.first_pause = first_pause
        self.max_pause = max_pause
        self._post = post
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._cond = threading.Condition()
        self._queue: collections.deque[bytes] = collections.deque()
        self._busy = False  # a message taken off the queue and not yet sent or given up
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stats = Stats()
        self._drops_logged_at = -DROP_LOG_EVERY

    def __repr__(self) -> str:
        return f"Notifier({redact(self.url)!r})"

    def send(self, entries: Iterable[AuditEntry]) -> None:
        """Queue one message per audit row; never blocks on the receiver, never raises."""
        try:
            bodies = [json.dumps(message(e), ensure_ascii=True).encode() for e in entries]
            if not bodies:
                return
            if self._pid != os.getpid():
                self._reset()  # a forked child: its parent's thread and queue are not its own
            with self._cond:
                for body in bodies:
                    if len(self._queue) >= self.queue_size:
                        self._queue.popleft()
                        self._stats.dropped += 1
                        self._log_drop()
                    self._queue.append(body)
                self._cond.notify()
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(
                        target=self._loop, name="hitl-notify", daemon=True
                    )
                    self._thread.start()
        except Exception:
            logger.exception("could not queue a notification for %s", redact(self.url))

    def _log_drop(self) -> None:
        now = time.monotonic()
        if now - self._drops_logged_at >= DROP_LOG_EVERY:
            self._drops_logged_at = now
            logger.warning(
                "notify: the queue of %d messages for %s is full (receiver slow or down): "
                "dropped the oldest; %d dropped so far (the audit keeps every action)",
                self.queue_size, redact(self.url), self._stats.dropped,
            )

    def stats(self) -> Stats:
        with self._cond:
            return dataclasses.replace(self._stats, queued=len(self._queue))

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every queued message to be sent or given up."""
        if self._pid != os.getpid():
            return True
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float = 0.0) -> None:
        """Flush for up to ``timeout`` seconds, then stop the thread."""
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                body = self._queue.popleft()
                self._busy = True
            try:
                self._deliver(body)
            except Exception:  # a bug: the thread must live on
                logger.exception("notify: delivering to %s failed", redact(self.url))
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _deliver(self, body: bytes) -> None:
        pause = self.first_pause
        problem = ""
        for attempt in range(1, self.attempts + 1):
            retry_after: str | None = None
            try:
                status, retry_after = self._post(self.url, body, self.timeout)
            except OSError as exc:  # refused, reset, timed out, no such host
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if 200 <= status < 300:
                    with self._cond:
                        self._stats.sent += 1
                    return
                problem = f"HTTP {status}"
                if 400 <= status < 500 and status not in (408, 429):
                    break  # it refuses the message itself: trying again changes nothing
            if attempt == self.attempts:
                break
            wait = min(_seconds(retry_after, pause), self.max_pause)
            logger.info("notify: %s answered %s; retry %d in %.1f s",
                        redact(self.url), problem, attempt, wait)
            with self._cond:
                self._stats.retries += 1
                if self._cond.wait_for(lambda: self._closed, wait):
                    break
            pause *= 2
        with self._cond:
            self._stats.failed += 1
        logger.warning("notify: gave up on a message to %s (%s); the audit keeps the action",
                       redact(self.url), problem)


def _seconds(retry_after: str | None, default: float) -> float:
    try:
        return max(0.0, float(retry_after)) if retry_after else default
    except ValueError:
        return default  # an HTTP date: rare from webhooks, and our pause is as good


# One notifier per URL and process, shared by every applier in it (a script calling
# hitl_pruner.prune() in a loop starts one thread, not one per call).
_notifiers: dict[str, Notifier] = {}
_lock = threading.Lock()


def notifier_for(url: str) -> Notifier:
    with _lock:
        found = _notifiers.get(url)
        if found is None:
            found = _notifiers[url] = Notifier(url)
        return found


def flush_all(timeout: float) -> bool:
    """Wait, at most ``timeout`` seconds in all, for this process's notifiers to send."""
    deadline = time.monotonic() + timeout
    with _lock:
        notifiers = list(_notifiers.values())
    done = True
    for notifier in notifiers:
        if not notifier.flush(max(0.0, deadline - time.monotonic())):
            stats = notifier.stats()
            logger.warning("notify: %d messages to %s not sent in %.0f s; the audit keeps "
                           "those actions", stats.queued, redact(notifier.url), timeout)
            done = False
    return done


atexit.register(flush_all, EXIT_FLUSH)
