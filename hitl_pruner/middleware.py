"""The WSGI middleware around optuna-dashboard: note saves apply their command before returning."""

from __future__ import annotations

import io
import json
import logging
import os
import threading
from typing import TYPE_CHECKING
from typing import Any
from typing import Callable
from typing import Iterable

from optuna.trial import TrialState

# Imported for its check alone: on a dashboard release whose note API, routes and keys nobody
# checked, importing the middleware fails (dashboard.py), as create_app and wsgi do.
from . import dashboard  # noqa: F401
from . import outage
from .applier import Applier
from .commands import Command
from .health import HEALTH_PATH
from .routes import MAX_ID
from .routes import PLAIN_FORM
from .routes import SAFE_METHODS
from .routes import TELL
from .routes import TRIAL_NOTE
from .routes import dashboard_path
from .routes import mutating_route
from .store import Note
from .store import Store
from .store import TrialRef
from .study_stop import STUDY_NOTE
from .study_stop import StudyStops
from .study_stop import says_stop
from .sweep import Sweeper

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse
    from _typeshed.wsgi import WSGIApplication
    from _typeshed.wsgi import WSGIEnvironment

logger = logging.getLogger(__name__)

# A tell body is a few bytes: {"state": "Fail"}, or Complete with the objective values.
MAX_TELL_REQUEST = 64 * 1024
# The only bodies bottle reads as JSON (its request.json), compared as bottle compares them.
JSON_TYPES = ("application/json", "application/json-rpc")
OUTCOME_HEADER = "X-Hitl-Outcome"
# The note API's answer to a save of another version than the stored one + 1, word for word
# (optuna_dashboard/_app.py save_trial_note; tests/test_note_save.py compares the two).
NOTE_CHANGED = (
    "The text you are editing has changed. Please copy your edits and refresh the page."
)
# optuna-dashboard lifts bottle's body limit to 128 MiB for artifact uploads, and stores a note
# as one write per 2045 characters: a megabyte note would be ~500 transactions. Notes get less.
MAX_NOTE_REQUEST = 100 * 1024


class HitlMiddleware:
    """Serve optuna-dashboard, and apply PRUNE/FAIL notes as they are saved.

    ``PUT /api/studies/<study_id>/<trial_id>/note`` keeps the dashboard's answers (204, or 409
    with the stored note). On a store that saves notes itself (an RDB: ``Applier.save``) we
    save it, with the trial's change in the same transaction when the note forces one; on any
    other, the dashboard saves it. Either way the note's command is applied before the response
    leaves, and the ``X-Hitl-Outcome`` header (JSON) says what happened.

    ``POST /api/trials/<trial_id>/tell`` with state Fail (the dashboard's Fail Trial button) on
    a RUNNING or WAITING trial takes the same path as a FAIL note: a worker using
    HumanInTheLoopPruner is asked, any other is forced, and the change is audited; the answer is
    a 204 with the same header. Other tells go to the dashboard once checked: a JSON object
    (Content-Type as the dashboard reads it, 415 otherwise) of at most 64 KiB (413) with a
    string ``state`` (400), for a trial that exists (404) and is RUNNING or WAITING (409).

    Deny by default: a request with any method but GET, HEAD or OPTIONS passes only when it
    names one of the dashboard's state-changing routes in plain form (routes.py): upper-case
    method, ASCII path, ids in ASCII digits without sign or leading zeros and below 2**63,
    trailing slashes allowed. Anything else, e.g. ``/api/studies/1/%D9%A3/note`` (which the
    dashboard would read as trial 3) or ``/api/studies/1/-2/note``, gets a JSON 404 and never
    reaches the dashboard. So no spelling of the note or tell route skips the checks above.

    Bodies we read are handed on as exactly those bytes (a fixed ``CONTENT_LENGTH``, no
    ``Transfer-Encoding`` for the dashboard to decode again). Bad input gets a JSON 4xx with a
    reason, never a 5xx. ``GET /healthz`` is answered by ``health`` (health.py), when given.
    Every other request (GET, HEAD, OPTIONS) passes through untouched.
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
        # STOP in a study's note (study_stop.py).
        self.stops = StudyStops(applier)

    def __getattr__(self, name: str) -> Any:
        # The dashboard's attributes (a bottle.Bottle: route, _inmemory_cache ...) through us.
        if name == "app":  # not set yet: no wrapped app to ask
            raise AttributeError(name)
        return getattr(self.app, name)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if self._autostart and self._pid != os.getpid():
            self.start_background()
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "")
        if path == HEALTH_PATH and self.health is not None and method.upper() in ("GET", "HEAD"):
            return self.health(environ, start_response)
        # bottle upper-cases the method: "get" is a GET to it, and reads nothing but GET's routes.
        if method == "GET" or method.upper() in SAFE_METHODS:
            return self.app(environ, start_response)
        route = mutating_route(method, path)
        if route is None:
            seen = dashboard_path(path)
            plain = seen in (None, path.rstrip("/") or "/")
            read_as = "" if plain else f" (the dashboard would read {seen!r})"
            reason = f"no route for {method} {path!r}{read_as}: {PLAIN_FORM}"
            return _json(start_response, "404 Not Found", {"reason": reason})
        name, ids = route
        if name == TRIAL_NOTE:
            return self._save_note(environ, start_response, ids[0], ids[1])
        if name == TELL:
            return self._tell(environ, start_response, ids[0])
        if name == STUDY_NOTE:
            return self._save_study_note(environ, start_response, ids[0])
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
        raw = _read_body(environ, MAX_NOTE_REQUEST)
        if raw is None:
            reason = (
                f"the note is too long: at most {MAX_NOTE_REQUEST // 1024} KiB per save "
                "(long notes are stored as many small writes); attach large text as an artifact"
            )
            return _json(start_response, "413 Request Entity Too Large", {"reason": reason})
        request, problem = _parse(raw)
        if problem:
            return _json(start_response, "400 Bad Request", {"reason": problem})
        # The dashboard reads JSON only under this content type, and fails with a 500 without it.
        environ["CONTENT_TYPE"] = "application/json"
        ref = self.store.trials([trial_id]).get(trial_id)
        if ref is None or ref.study_id != study_id:
            reason = f"study_id={study_id} has no trial with trial_id={trial_id}"
            return _json(start_response, "404 Not Found", {"reason": reason})

        note = Note(request["version"], request["body"])
        user = environ.get("REMOTE_USER") or None
        self.applier.before_save(ref, note, user=user)
        if self.applier.saves_notes:
            return self._save_here(environ, start_response, ref, note, user)
        status, headers, exc_info, body = self._dashboard_saves(environ)
        if status.startswith("204"):
            headers.append((OUTCOME_HEADER, self._apply_saved(environ, ref, note, user)))
        start_response(status, headers, exc_info)
        return body

    def _save_study_note(self, environ: WSGIEnvironment, start_response: StartResponse,
                         study_id: int) -> Iterable[bytes]:
        """``PUT /api/studies/<study_id>/note``: checked as a trial note's save (413, 400), saved by
        the dashboard, and its STOP applied before the answer, in ``X-Hitl-Outcome``."""
        raw = _read_body(environ, MAX_NOTE_REQUEST)
        if raw is None:
            reason = f"the note is too long: at most {MAX_NOTE_REQUEST // 1024} KiB per save"
            return _json(start_response, "413 Request Entity Too Large", {"reason": reason})
        request, problem = _parse(raw)
        if problem:
            return _json(start_response, "400 Bad Request", {"reason": problem})
        environ["CONTENT_TYPE"] = "application/json"
        stops = self.stops
        note = Note(request["version"], request["body"])
        user = environ.get("REMOTE_USER") or None
        stops.before_save(study_id, note, user)
        status, headers, exc_info, body = self._dashboard_saves(environ)
        if status.startswith("204"):
            try:
                outcome = stops.apply(study_id, note, source="note-save", user=user)
            except Exception:
                logger.exception("applying the note of study id %d failed", study_id)
                outcome = {"action": "error", "reason": "retried by sweep"}
            # A note that has nothing to do with STOP is the dashboard's business alone: no header.
            if says_stop(note.body) or outcome["action"] != "nothing to do":
                headers.append((OUTCOME_HEADER, json.dumps(outcome)))
        start_response(status, headers, exc_info)
        return body

    def _dashboard_saves(
        self, environ: WSGIEnvironment
    ) -> tuple[str, list[tuple[str, str]], Any, list[bytes]]:
        """The dashboard's own note save: its status, headers (a copy, to add ours to),
        exc_info and body, held back so that our outcome can go into the headers."""
        captured: dict[str, Any] = {}

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            captured.update(status=status, headers=headers, exc_info=exc_info)
            return lambda data: None

        body = list(self.app(environ, capture))
        return captured["status"], list(captured["headers"]), captured["exc_info"], body

    def _save_here(
        self, environ: WSGIEnvironment, start_response: StartResponse, ref: TrialRef, note: Note,
        user: str | None,
    ) -> Iterable[bytes]:
        """The note API's answers, the note saved by our store (Applier.save)."""
        try:
            saved = self.applier.save(ref, note, user=user)
        except Exception as exc:
            if outage.unavailable(exc):
                raise  # OutageMiddleware answers 503 with Retry-After, and logs the outage once
            logger.exception("saving the note of trial id %d failed", ref.trial_id)
            return _json(start_response, "500 Internal Server Error",
                         {"reason": "internal server error"})
        if isinstance(saved, Note):
            stored = {"version": saved.version, "body": saved.body}
            return _json(start_response, "409 Conflict", {"reason": NOTE_CHANGED, "note": stored})
        if saved is None:  # saved alone: applied as after any save
            header = self._apply_saved(environ, ref, note, user)
        else:
            header = saved.header()
        start_response("204 No Content", [(OUTCOME_HEADER, header)])
        return []

    def _apply_saved(
        self, environ: WSGIEnvironment, ref: TrialRef, note: Note, user: str | None
    ) -> str:
        """Apply a note saved a moment ago; the X-Hitl-Outcome header's value."""
        try:
            return self.applier.apply(ref, note, source="note-save", user=user).header()
        except Exception as exc:
            # The note is saved and queued: the sweep applies it once the database answers.
            if outage.unavailable(exc):
                outage.report(environ, exc)  # once per outage, not per request
            else:
                logger.exception("applying the note of trial id %d failed", ref.trial_id)
            return json.dumps({"action": "error", "reason": "retried by sweep"})

    def _tell(
        self, environ: WSGIEnvironment, start_response: StartResponse, trial_id: int
    ) -> Iterable[bytes]:
        raw = _read_body(environ, MAX_TELL_REQUEST)
        if raw is None:
            reason = f"a tell is a few bytes: at most {MAX_TELL_REQUEST // 1024} KiB"
            return _json(start_response, "413 Request Entity Too Large", {"reason": reason})
        content_type = environ.get("CONTENT_TYPE", "")
        if content_type.lower().split(";")[0] not in JSON_TYPES:
            # The dashboard would read no body at all, and fail.
            reason = f"send the body as JSON (Content-Type: application/json), not {content_type!r}"
            return _json(start_response, "415 Unsupported Media Type", {"reason": reason})
        request, problem = _json_object(raw, '{"state": "Fail"}')
        if problem:
            return _json(start_response, "400 Bad Request", {"reason": problem})
        state = request.get("state")
        if not isinstance(state, str):
            reason = "\"state\" must be \"Complete\" (with \"values\") or \"Fail\""
            return _json(start_response, "400 Bad Request", {"reason": reason})
        ref = self.store.trials([trial_id]).get(trial_id)
        if ref is None:
            reason = f"there is no trial with trial_id={trial_id}"
            return _json(start_response, "404 Not Found", {"reason": reason})
        if ref.state not in (TrialState.RUNNING, TrialState.WAITING):
            reason = (
                f"trial_id={trial_id} is {ref.state.name}: only a RUNNING or WAITING trial can be "
                "told its result; relabel a finished trial with FAIL or PRUNE in its note"
            )
            return _json(start_response, "409 Conflict", {"reason": reason})
        # The dashboard reads the state case-insensitively; a Complete stays its business.
        if state.upper() != TrialState.FAIL.name:
            if state.upper() == TrialState.COMPLETE.name and _told_values(request):
                # The human's own verdict is the latest word on the trial: an open request to
                # its worker is dropped first, or the sweep would relabel the told trial.
                self.applier.human_told(
                    ref, TrialState.COMPLETE, environ.get("REMOTE_USER") or None
                )
            return self.app(environ, start_response)
        try:
            outcome = self.applier.command(
                ref, Command.FAIL, source="fail-button", user=environ.get("REMOTE_USER") or None
            )
        except Exception as exc:
            if outage.unavailable(exc):
                raise  # OutageMiddleware answers 503 with Retry-After, and logs the outage once
            logger.exception("failing trial id %d failed", trial_id)
            return _json(start_response, "500 Internal Server Error",
                         {"reason": "internal server error"})
        if outcome.action == "not monitored":
            return self.app(environ, start_response)
        start_response("204 No Content", [(OUTCOME_HEADER, outcome.header())])
        return []


def _read_body(environ: WSGIEnvironment, limit: int) -> bytes | None:
    """The request's body, or None when it is longer than ``limit`` bytes.

    The wrapped app then reads exactly these bytes: ``wsgi.input`` is replaced, with their
    length in ``CONTENT_LENGTH`` and no ``Transfer-Encoding``, which bottle would take as a
    request to undo a chunked framing the server has undone already.
    """
    try:
        length = int(environ.get("CONTENT_LENGTH") or -1)
    except ValueError:
        length = -1
    if length > limit:
        return None
    raw = environ["wsgi.input"].read(length if length >= 0 else limit + 1)
    if len(raw) > limit:
        return None
    environ["wsgi.input"] = io.BytesIO(raw)
    environ["CONTENT_LENGTH"] = str(len(raw))
    environ.pop("HTTP_TRANSFER_ENCODING", None)
    return raw


def _told_values(request: dict[str, Any]) -> bool:
    """Whether the dashboard will accept the tell's values, as it reads them."""
    try:
        [float(v) for v in request["values"]]
    except (KeyError, ValueError, TypeError, OverflowError):
        return False
    return True


def _json_object(raw: bytes, example: str) -> tuple[dict[str, Any], str | None]:
    """The body as a JSON object, read as the dashboard reads it (UTF-8), or why not."""
    try:
        request = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return {}, f"the body must be JSON in UTF-8: {example}"
    if not isinstance(request, dict):
        return {}, f"the body must be a JSON object: {example}"
    return request, None


def _parse(raw: bytes) -> tuple[dict[str, Any], str | None]:
    """Check a note-save body; return it, or the reason it cannot be saved."""
    request, problem = _json_object(raw, "{\"version\": <int>, \"body\": <string>}")
    if problem:
        return {}, problem
    version, body = request.get("version"), request.get("body")
    # Versions count saves from 1; a larger one than the database holds is no next version.
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= MAX_ID:
        return {}, "\"version\" must be an integer: the stored version + 1"
    if not isinstance(body, str):
        return {}, "\"body\" must be a string"
    try:
        body.encode("utf-8")
    except UnicodeEncodeError:
        return {}, "\"body\" must be text: it holds an unpaired surrogate (\\ud800-\\udfff)"
    return request, None


def _json(start_response: StartResponse, status: str, payload: dict[str, Any]) -> list[bytes]:
    data = json.dumps(payload).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]
