"""The WSGI middleware around optuna-dashboard: note saves apply their command before returning."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import threading
from typing import TYPE_CHECKING
from typing import Any
from typing import Callable
from typing import Iterable

from optuna.trial import TrialState

from .applier import Applier
from .commands import Command
from .health import HEALTH_PATH
from .store import Note
from .store import Store
from .sweep import Sweeper

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse
    from _typeshed.wsgi import WSGIApplication
    from _typeshed.wsgi import WSGIEnvironment

logger = logging.getLogger(__name__)

# The dashboard strips trailing slashes before routing, so we match them too.
NOTE_PATH = re.compile(r"^/api/studies/(\d+)/(\d+)/note/*$")
# The dashboard's "Fail Trial" button: POST {"state": "Fail"}.
TELL_PATH = re.compile(r"^/api/trials/(\d+)/tell/*$")
# A tell body is a few bytes; anything larger goes to the dashboard unread by us.
MAX_TELL_REQUEST = 64 * 1024
OUTCOME_HEADER = "X-Hitl-Outcome"
# optuna-dashboard lifts bottle's body limit to 128 MiB for artifact uploads, and stores a note
# as one write per 2045 characters: a megabyte note would be ~500 transactions. Notes get less.
MAX_NOTE_REQUEST = 100 * 1024


class HitlMiddleware:
    """Serve optuna-dashboard, and apply PRUNE/FAIL notes as they are saved.

    ``PUT /api/studies/<study_id>/<trial_id>/note`` goes to the dashboard as always; when the
    dashboard saved the note (204), the note's command is applied before the response leaves,
    and the ``X-Hitl-Outcome`` header (JSON) says what happened.

    ``POST /api/trials/<trial_id>/tell`` with state Fail (the dashboard's Fail Trial button) on
    a RUNNING or WAITING trial takes the same path as a FAIL note: a worker using
    HumanInTheLoopPruner is asked, any other is forced, and the change is audited; the answer is
    a 204 with the same header. ``GET /healthz`` is answered by ``health`` (health.py), when
    given. Every other request passes through untouched.
    """

    def __init__(
        self,
        app: WSGIApplication,
        *,
        applier: Applier,
        store: Store,
        sweeper: Sweeper | None = None,
        after_fork: Callable[[], None] | None = None,
        autostart: bool = True,
        health: WSGIApplication | None = None,
    ) -> None:
        self.app = app
        self.applier = applier
        self.store = store
        self.sweeper = sweeper
        self._after_fork = after_fork
        # Start the sweep on a process's first request, for servers without our gunicorn hooks.
        self._autostart = autostart
        self._pid: int | None = None
        self._lock = threading.Lock()
        self.health = health

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if self._autostart and self._pid != os.getpid():
            self.start_background()
        if (
            self.health is not None
            and environ.get("PATH_INFO") == HEALTH_PATH
            and environ.get("REQUEST_METHOD") in ("GET", "HEAD")
        ):
            return self.health(environ, start_response)
        if environ.get("REQUEST_METHOD") == "PUT":
            match = NOTE_PATH.match(environ.get("PATH_INFO", ""))
            if match:
                return self._save_note(environ, start_response, int(match[1]), int(match[2]))
        elif environ.get("REQUEST_METHOD") == "POST":
            match = TELL_PATH.match(environ.get("PATH_INFO", ""))
            if match:
                return self._tell(environ, start_response, int(match[1]))
        return self.app(environ, start_response)

    def start_background(self) -> None:
        """Start this process's sweep; call it after a fork (gunicorn's post_worker_init)."""
        with self._lock:
            pid = os.getpid()
            if self._pid == pid:
                return
            if self._after_fork is not None:
                self._after_fork()  # pooled connections opened before a fork are the parent's
            self._pid = pid
            if self.sweeper is not None:
                self.sweeper.start()

    def stop_background(self) -> None:
        if self.sweeper is not None:
            self.sweeper.stop()

    def _save_note(
        self, environ: WSGIEnvironment, start_response: StartResponse, study_id: int, trial_id: int
    ) -> Iterable[bytes]:
        try:
            length = int(environ.get("CONTENT_LENGTH") or -1)
        except ValueError:
            length = -1
        raw = b"" if length > MAX_NOTE_REQUEST else environ["wsgi.input"].read(
            length if length >= 0 else MAX_NOTE_REQUEST + 1
        )
        if length > MAX_NOTE_REQUEST or len(raw) > MAX_NOTE_REQUEST:
            reason = (
                f"the note is too long: at most {MAX_NOTE_REQUEST // 1024} KiB per save "
                "(long notes are stored as many small writes); attach large text as an artifact"
            )
            return _json(start_response, "413 Request Entity Too Large", {"reason": reason})
        request, problem = _parse(raw)
        if problem:
            return _json(start_response, "400 Bad Request", {"reason": problem})
        environ["wsgi.input"] = io.BytesIO(raw)
        # The dashboard reads JSON only under this content type, and fails with a 500 without it.
        environ["CONTENT_TYPE"] = "application/json"
        ref = self.store.trials([trial_id]).get(trial_id)
        if ref is None or ref.study_id != study_id:
            reason = f"study_id={study_id} has no trial with trial_id={trial_id}"
            return _json(start_response, "404 Not Found", {"reason": reason})

        note = Note(request["version"], request["body"])
        user = environ.get("REMOTE_USER") or None
        self.applier.before_save(ref, note, user=user)
        captured: dict[str, Any] = {}

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            captured.update(status=status, headers=headers, exc_info=exc_info)
            return lambda data: None

        body = list(self.app(environ, capture))
        headers = list(captured["headers"])
        if captured["status"].startswith("204"):
            try:
                outcome = self.applier.apply(
                    ref,
                    Note(request["version"], request["body"]),
                    source="note-save",
                    user=environ.get("REMOTE_USER") or None,
                )
                headers.append((OUTCOME_HEADER, outcome.header()))
            except Exception:
                # The note is saved and queued: the sweep applies it once the database answers.
                logger.exception("applying the note of trial id %d failed", trial_id)
                headers.append(
                    (OUTCOME_HEADER, json.dumps({"action": "error", "reason": "retried by sweep"}))
                )
        start_response(captured["status"], headers, captured["exc_info"])
        return body


    def _tell(
        self, environ: WSGIEnvironment, start_response: StartResponse, trial_id: int
    ) -> Iterable[bytes]:
        try:
            length = int(environ.get("CONTENT_LENGTH") or -1)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_TELL_REQUEST:
            return self.app(environ, start_response)
        raw = environ["wsgi.input"].read(length)
        environ["wsgi.input"] = io.BytesIO(raw)
        try:
            state = json.loads(raw).get("state")
        except (ValueError, UnicodeDecodeError, AttributeError):
            state = None
        # The dashboard reads the state case-insensitively; anything else stays its business.
        if not isinstance(state, str) or state.upper() != TrialState.FAIL.name:
            return self.app(environ, start_response)
        ref = self.store.trials([trial_id]).get(trial_id)
        if ref is None or ref.state not in (TrialState.RUNNING, TrialState.WAITING):
            return self.app(environ, start_response)
        try:
            outcome = self.applier.command(
                ref, Command.FAIL, source="fail-button", user=environ.get("REMOTE_USER") or None
            )
        except Exception:
            logger.exception("failing trial id %d failed", trial_id)
            return _json(start_response, "503 Service Unavailable",
                         {"reason": "the database did not answer; try again"})
        if outcome.action == "not monitored":
            return self.app(environ, start_response)
        start_response("204 No Content", [(OUTCOME_HEADER, outcome.header())])
        return []


def _parse(raw: bytes) -> tuple[dict[str, Any], str | None]:
    """Check a note-save body; return it, or the reason it cannot be saved."""
    try:
        request = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}, "the body must be JSON: {\"version\": <int>, \"body\": <string>}"
    if not isinstance(request, dict):
        return {}, "the body must be a JSON object: {\"version\": <int>, \"body\": <string>}"
    version, body = request.get("version"), request.get("body")
    if not isinstance(version, int) or isinstance(version, bool):
        return {}, "\"version\" must be an integer: the stored version + 1"
    if not isinstance(body, str):
        return {}, "\"body\" must be a string"
    return request, None


def _json(start_response: StartResponse, status: str, payload: dict[str, Any]) -> list[bytes]:
    data = json.dumps(payload).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]
