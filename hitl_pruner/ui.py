"""The dashboard's human side: Prune/Fail buttons, outcome toasts, and the Human actions view.

``UiMiddleware`` wraps :class:`~hitl_pruner.middleware.HitlMiddleware`, so a note it saves goes
through the same note-save path as one typed in the dashboard. It answers:

``GET /dashboard...``
    The dashboard's page, with ``<link href=/hitl/static/hitl.css>`` and
    ``<script src=/hitl/static/hitl.js defer>`` added to its head. Both are same-origin, which
    the dashboard's Content-Security-Policy (kept as it is) allows. The files on disk are not
    touched.
``GET /hitl/static/<file>``
    The files of ``hitl_pruner/static``.
``GET /hitl/actions``
    The Human actions page: the audit, newest first, with an Undo for retroactive relabels.
``GET /hitl/api/actions?study=1&trial=5&user=ann&action=relabel&before=<cursor>&limit=100``
    The audit as JSON, newest first, a page at a time: ``{"actions": [...], "limit": n,
    "next": <cursor or null>, "filter": {...}}``. Each action is an
    :meth:`AuditEntry.to_json` plus ``state_now`` (the trial's state now), ``undoable``,
    ``undo_refused`` (why not, or null), and ``study_url`` and ``trial_url``, the dashboard's
    pages of its study and trial (under the path prefix). Filters, each optional (an empty
    value is no filter): ``study`` (a study id), ``trial`` (a trial number; needs ``study``),
    ``user`` (exactly), ``action`` (``prune``, ``fail``, ``relabel`` or ``undo``: see
    :data:`~hitl_pruner.store.AUDIT_ACTIONS`). ``limit`` is 1 to 1000. The next page is
    ``before=<next>`` with the same filters: keyset pagination, so a deep page costs what the
    first does, and actions recorded meanwhile never shift a page. Any other parameter, one
    given twice, or a bad value is a 400 that says why.
``GET /hitl/api/actions.csv?<the same filters>``
    Every matching action as CSV, newest first (``Content-Disposition: attachment``), read and
    sent a thousand rows at a time. Cells that a spreadsheet would read as a formula (starting
    with ``=``, ``+``, ``-``, ``@``, tab or carriage return) get a leading ``'``.
``GET /hitl/api/studies/<study_id>/<trial_id>``
    The trial's state and note, and for each command whether a note carrying it would change
    the trial (the applier's own rules): what the buttons show.
``GET /hitl/api/studies/<study_id>/changes?since=<cursor>``
    What changed in the study after ``since``, for the page to show at once (hitl.js polls it
    every half second; live.py): ``{"study_id": 1, "since": 41, "latest": 44, "more": false,
    "changes": [{"id": 43, "trial_id": 7, "number": 6, "to_state": "PRUNED"}]}``, oldest
    first. The cursor is global (the newest audit id; a journal's record time in
    microseconds): ask next with ``since=<latest>``; ``more`` says the answer stopped at
    ``CHANGES_LIMIT`` records, so ask again at once. Without ``since``, ``latest`` is the
    newest cursor and ``changes`` is empty: a page starts from now. ``since`` must be one
    integer from 0 to 2**63 - 1 in plain form, else 400. It also lets this process's
    :class:`~hitl_pruner.live.AuditWatcher` look for changes made elsewhere.
``POST /hitl/api/studies/<study_id>/bulk``
    Prune, fail or undo many trials (by number, state or parameter range) in one request, each
    through the note-save path with its own note version and audit row; see bulk.py.
``GET|POST /hitl/api/studies/<study_id>/stop``
    Whether a human stopped the study (STOP in its note), by whom and when; a POST of
    ``{"stop": true|false}`` writes STOP into the study's note or takes it out, through the
    dashboard's study note API (``UiMiddleware._stop``, study_stop.py).
``POST /hitl/api/actions/<id>/undo``
    Removes the command words from the trial's note and saves the next version through
    ``PUT /api/studies/<sid>/<tid>/note``; the note-save then puts the trial back to COMPLETE.
    Answers ``{"outcome": ..., "note": ...}`` with the ``X-Hitl-Outcome`` header, or the
    dashboard's 409 when the note changed meanwhile. It needs ``Content-Type:
    application/json``: a cross-site form cannot send that, so no other site can undo for you.

Under a prefix (``SCRIPT_NAME``, set by :class:`~hitl_pruner.prefix.ProxyMiddleware`), it also
answers ``GET /`` with a redirect to ``<prefix>/dashboard``, loads the dashboard's bundle from
``<prefix>/static/bundle.js``, and serves that bundle with its routes and API calls moved
under the prefix (see :func:`~hitl_pruner.prefix.prefixed_bundle`).

Ids in these paths are read in plain form only (routes.py: ASCII digits, no sign or leading
zero, below 2**63); any other spelling is a JSON 404. Every other request goes to the wrapped
app untouched. Attributes this class does not have
(``start_background``, ``stop_background``, ``sweeper``, ``store``, ``app`` ...) are the
wrapped middleware's, so ``create_app`` can return it in HitlMiddleware's place.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import html
import io
import json
import logging
import mimetypes
from pathlib import Path
import re
from typing import TYPE_CHECKING
from typing import Any
from typing import Iterable
from typing import Iterator
from urllib.parse import parse_qs
from urllib.parse import quote

from optuna.storages import BaseStorage

from . import bulk
from . import outage
from . import study_stop
from .applier import Applier
from .audit import AuditEntry
from .commands import Command
from .dashboard import PAGE_CSP_ADDED
from .live import AuditWatcher
from .middleware import OUTCOME_HEADER
from .prefix import BUNDLE_PATH
from .prefix import clean_prefix
from .prefix import prefixed_bundle
from .prefix import prefixed_page
from .routes import ID
from .routes import MAX_ID
from .routes import dashboard_path
from .routes import ids
from .store import AUDIT_ACTIONS
from .store import AuditFilter
from .store import Note
from .store import TrialRef
from .transitions import Action

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse
    from _typeshed.wsgi import WSGIApplication
    from _typeshed.wsgi import WSGIEnvironment

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
# The dashboard serves its single-page app for every path under /dashboard.
# Matched on the path as the dashboard reads it (routes.dashboard_path): any spelling it serves.
DASHBOARD_PAGE = re.compile(r"^/dashboard(/.*)?$")
NEVER_THE_PAGE = ("/api/", "/static/")
STATIC_PATH = re.compile(r"^/hitl/static/([A-Za-z0-9_.-]+)\Z")
# Ids in plain form only, as routes.py: ASCII digits, no sign or leading zero, below 2**63.
TRIAL_PATH = re.compile(rf"^/hitl/api/studies/{ID}/{ID}\Z")
UNDO_PATH = re.compile(rf"^/hitl/api/actions/{ID}/undo\Z")
CHANGES_PATH = re.compile(rf"^/hitl/api/studies/{ID}/changes\Z")
ACTIONS_CSV_PATH = "/hitl/api/actions.csv"
# The parameters of the actions API; the CSV takes all but limit.
ACTIONS_PARAMS = ("study", "trial", "user", "action", "before", "limit")
USER_MAX = 256  # hitl_audit.user_name
# Rows read from the database per CSV chunk.
CSV_CHUNK = 1000
CSV_COLUMNS = (
    "id", "time", "study_id", "study_name", "trial_id", "trial_number", "from", "to",
    "retroactive", "undo", "user", "source", "how", "note_version", "reason", "state_now",
)
# A spreadsheet reads a cell starting with one of these as a formula (OWASP, CSV injection).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
BULK_PATH = re.compile(rf"^/hitl/api/studies/{ID}/bulk\Z")
STOP_PATH = re.compile(rf"^/hitl/api/studies/{ID}/stop\Z")
PLAIN_ID = re.compile(rf"{ID}\Z")
# Records read per changes poll (of every study: the cursor is global); a page that is behind
# by more asks again at once.
CHANGES_LIMIT = 500
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
# Rewritten bundles kept, one per prefix: prefixes come from the operator or trusted proxies.
MAX_BUNDLES = 8
PAGE_CSP = ";".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "frame-ancestors 'self'",
    ]
)
# Kept from the request when Undo calls the note-save path on its behalf.
FORWARDED_KEYS = (
    "SCRIPT_NAME",
    "SERVER_NAME",
    "SERVER_PORT",
    "SERVER_PROTOCOL",
    "REMOTE_ADDR",
    "REMOTE_USER",
    "HTTP_HOST",
    "wsgi.version",
    "wsgi.url_scheme",
    "wsgi.errors",
    "wsgi.multithread",
    "wsgi.multiprocess",
    "wsgi.run_once",
)


class _Static:
    def __init__(self, data: bytes, content_type: str) -> None:
        self.data = data
        self.content_type = content_type
        self.etag = f'"{hashlib.sha256(data).hexdigest()[:20]}"'
        self.gzipped: _Static | None = None


def _load_static(directory: Path) -> dict[str, _Static]:
    files = {}
    for path in sorted(directory.iterdir()):
        if not path.is_file():
            continue
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if content_type.startswith("text/") or content_type.endswith("javascript"):
            content_type += "; charset=utf-8"
        files[path.name] = _Static(path.read_bytes(), content_type)
    return files


class UiMiddleware:
    """Serve hitl-pruner's pages, API and static files around ``HitlMiddleware``."""

    def __init__(
        self,
        application: WSGIApplication,
        *,
        applier: Applier,
        live: AuditWatcher,
        static_dir: Path = STATIC_DIR,
        storage: BaseStorage | None = None,
    ) -> None:
        self.application = application
        self.applier = applier
        self.live = live
        # What the bulk action reads trials from (None: no bulk action).
        self.storage = storage
        self._static = _load_static(static_dir)
        self._bundles: dict[str, _Static] = {}

    def __getattr__(self, name: str) -> Any:
        if name == "application":  # not set yet: no wrapped app to ask
            raise AttributeError(name)
        return getattr(self.application, name)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path.startswith(NEVER_THE_PAGE) and not environ.get("SCRIPT_NAME"):
            # The API and the bundle, most requests: at the root, nothing of ours.
            return self.application(environ, start_response)
        method = environ.get("REQUEST_METHOD", "GET")
        if path.startswith("/hitl/"):
            if path == "/hitl/actions/":
                # The page's links are relative to /hitl/actions.
                location = environ.get("SCRIPT_NAME", "").rstrip("/") + "/hitl/actions"
                start_response("301 Moved Permanently", [("Location", location),
                                                         ("Content-Length", "0")])
                return []
            try:
                return self._hitl(environ, start_response, method, path.rstrip("/"))
            except Exception as exc:
                if outage.unavailable(exc):
                    raise  # OutageMiddleware answers 503 with Retry-After, and logs it once
                logger.exception("%s %s failed", method, path)
                return _json(start_response, "500 Internal Server Error",
                             {"reason": "internal server error"})
        # The API and the bundle, most requests, are never the page in any reading of the path.
        if (method in ("GET", "HEAD") and not path.startswith(NEVER_THE_PAGE)
                and DASHBOARD_PAGE.match(dashboard_path(path) or "")):
            return self._page(environ, start_response, method)
        prefix = environ.get("SCRIPT_NAME", "").rstrip("/")
        if prefix and method in ("GET", "HEAD"):
            if path in ("", "/"):
                # The dashboard's own redirect would leave the prefix out.
                start_response("302 Found", [("Location", prefix + "/dashboard"),
                                             ("Content-Length", "0")])
                return []
            if path == BUNDLE_PATH:
                return self._bundle(environ, start_response, prefix)
        return self.application(environ, start_response)

    def _hitl(
        self, environ: WSGIEnvironment, start_response: StartResponse, method: str, path: str
    ) -> Iterable[bytes]:
        static = STATIC_PATH.match(path)
        if static or path == "/hitl/actions":
            if method not in ("GET", "HEAD"):
                return _not_allowed(start_response, "GET, HEAD")
            name = static[1] if static else "actions.html"
            return self._file(environ, start_response, name, page=not static)
        if path == "/hitl/api/actions":
            if method != "GET":
                return _not_allowed(start_response, "GET")
            return self._actions(environ, start_response)
        if path == ACTIONS_CSV_PATH:
            if method != "GET":
                return _not_allowed(start_response, "GET")
            return self._actions_csv(environ, start_response)
        trial = ids(TRIAL_PATH, path)
        if trial is not None:
            if method != "GET":
                return _not_allowed(start_response, "GET")
            return self._trial(start_response, trial[0], trial[1])
        changes = ids(CHANGES_PATH, path)
        if changes is not None:
            if method != "GET":
                return _not_allowed(start_response, "GET")
            return self._changes(environ, start_response, changes[0])
        stop = ids(STOP_PATH, path)
        if stop is not None:  # a study's Stop/Resume (study_stop.py)
            return self._stop(environ, start_response, stop[0])
        undo = ids(UNDO_PATH, path)
        if undo is not None:
            if method != "POST":
                return _not_allowed(start_response, "POST")
            return self._undo(environ, start_response, undo[0])
        many = ids(BULK_PATH, path)
        if many is not None:
            if method != "POST":
                return _not_allowed(start_response, "POST")
            return self._bulk(environ, start_response, many[0])
        return _json(start_response, "404 Not Found", {"reason": f"no such page: {path}"})

    # -- the dashboard's page -------------------------------------------------------------

    def _page(
        self, environ: WSGIEnvironment, start_response: StartResponse, method: str
    ) -> Iterable[bytes]:
        inner = dict(environ)
        # Always fetch the whole page: a 304 or a range of it would skip the injection.
        for key in ("HTTP_IF_NONE_MATCH", "HTTP_IF_MODIFIED_SINCE", "HTTP_RANGE", "HTTP_IF_RANGE"):
            inner.pop(key, None)
        inner["REQUEST_METHOD"] = "GET"
        status, headers, exc_info, body = _capture(self.application, inner)
        header_names = {name.lower(): value for name, value in headers}
        if (
            not status.startswith("200")
            or not header_names.get("content-type", "").startswith("text/html")
            or "content-encoding" in header_names
        ):
            start_response(status, headers, exc_info)
            return [] if method == "HEAD" else [body]
        prefix = html.escape(environ.get("SCRIPT_NAME", "").rstrip("/"))
        page = _inject(prefixed_page(body, prefix) if prefix else body, prefix)
        kept = [
            (name, value) for name, value in headers
            if name.lower() not in ("content-length", "etag", "last-modified", "accept-ranges")
        ]
        kept += [("Content-Length", str(len(page))), ("Cache-Control", "no-cache")]
        if PAGE_CSP_ADDED is not None:  # optuna-dashboard 0.19 sends no policy of its own
            kept.append(("Content-Security-Policy", PAGE_CSP_ADDED))
        start_response(status, kept)
        return [] if method == "HEAD" else [page]

    def _bundle(
        self, environ: WSGIEnvironment, start_response: StartResponse, prefix: str
    ) -> Iterable[bytes]:
        if clean_prefix(prefix) != prefix:
            reason = f"the path prefix {prefix!r} is not a path like /optuna"
            return _json(start_response, "400 Bad Request", {"reason": reason})
        static = self._bundles.get(prefix)
        if static is None:
            inner = {k: v for k, v in environ.items() if not k.startswith("HTTP_")}
            inner.update(REQUEST_METHOD="GET", QUERY_STRING="", HTTP_ACCEPT_ENCODING="identity")
            status, headers, exc_info, body = _capture(self.application, inner)
            rewritten = prefixed_bundle(body, prefix) if status.startswith("200") else None
            if rewritten is None:
                if status.startswith("200"):
                    logger.warning("the dashboard's bundle.js is not the one hitl-pruner knows: "
                                   "it is served unchanged, and will not work under %s", prefix)
                start_response(status, headers, exc_info)
                return [body]
            static = _Static(rewritten, "application/javascript; charset=utf-8")
            # Compressed once, as the dashboard ships its own bundle.js.gz.
            static.gzipped = _Static(
                gzip.compress(rewritten, compresslevel=6, mtime=0), static.content_type
            )
            if len(self._bundles) >= MAX_BUNDLES:
                self._bundles.clear()
            self._bundles[prefix] = static
        if "gzip" in environ.get("HTTP_ACCEPT_ENCODING", "") and static.gzipped is not None:
            return self._send(environ, start_response, static.gzipped, page=False,
                              extra=[("Content-Encoding", "gzip"), ("Vary", "Accept-Encoding")])
        return self._send(environ, start_response, static, page=False,
                          extra=[("Vary", "Accept-Encoding")])

    def _file(
        self, environ: WSGIEnvironment, start_response: StartResponse, name: str, *, page: bool
    ) -> Iterable[bytes]:
        static = self._static.get(name)
        if static is None:
            return _json(start_response, "404 Not Found", {"reason": f"no such file: {name}"})
        return self._send(environ, start_response, static, page=page)

    def _send(
        self, environ: WSGIEnvironment, start_response: StartResponse, static: _Static, *,
        page: bool, extra: list[tuple[str, str]] | None = None,
    ) -> Iterable[bytes]:
        headers = [("ETag", static.etag), ("Cache-Control", "no-cache"), *(extra or [])]
        if page:
            headers.append(("Content-Security-Policy", PAGE_CSP))
        if static.etag in environ.get("HTTP_IF_NONE_MATCH", ""):
            start_response("304 Not Modified", headers)
            return []
        headers += [
            ("Content-Type", static.content_type),
            ("Content-Length", str(len(static.data))),
            ("X-Content-Type-Options", "nosniff"),
        ]
        start_response("200 OK", headers)
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else [static.data]

    # -- the API ---------------------------------------------------------------------------

    def _actions(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        asked = _actions_query(environ, paged=True)
        if isinstance(asked, str):
            return _json(start_response, "400 Bad Request", {"reason": asked})
        where, before, limit = asked
        entries, cursor = self.applier.store.audit_page(where, before=before, limit=limit)
        payload = {
            "actions": self._action_rows(entries, _prefix(environ)),
            "limit": limit,
            "next": cursor,
            "filter": {"study": where.study_id, "trial": where.trial_number, "user": where.user,
                       "action": where.action},
        }
        return _json(start_response, "200 OK", payload)

    def _action_rows(
        self, entries: list[AuditEntry], prefix: str, *, undo: bool = True
    ) -> list[dict[str, Any]]:
        """The actions API's rows: each record, the trial's state now, and whether Undo can."""
        store = self.applier.store
        now = store.trials({e.trial_id for e in entries})
        # Of the whole audit, not this page: a filter may leave the newer record out. Only a
        # relabel can be undone, so only a relabel's trial is looked up.
        newest = store.newest_audit_ids(
            {e.trial_id for e in entries if e.retroactive and not e.undo} if undo else ()
        )
        actions = []
        for entry in entries:
            ref = now.get(entry.trial_id)
            superseded = entry.id is not None and newest.get(entry.trial_id, entry.id) > entry.id
            refused = self._undo_refused(entry, ref, superseded=superseded)
            study_url = f"{prefix}/dashboard/studies/{entry.study_id}"
            actions.append(
                {
                    **entry.to_json(),
                    "state_now": ref.state.name if ref is not None else None,
                    "undoable": refused is None,
                    "undo_refused": refused,
                    "study_url": study_url,
                    "trial_url": study_url if entry.study_level
                    else f"{study_url}/trials?numbers={entry.trial_number}",
                }
            )
        return actions

    def _actions_csv(
        self, environ: WSGIEnvironment, start_response: StartResponse
    ) -> Iterable[bytes]:
        asked = _actions_query(environ, paged=False)
        if isinstance(asked, str):
            return _json(start_response, "400 Bad Request", {"reason": asked})
        where, before, _ = asked
        # The first chunk is read before the answer starts, so a database that is down gets
        # its 503 (or a 500) rather than a download cut short.
        first = self.applier.store.audit_page(where, before=before, limit=CSV_CHUNK)
        name = "hitl-actions"
        if where.study_id is not None:
            name += f"-study-{where.study_id}"
        start_response(
            "200 OK",
            [
                ("Content-Type", "text/csv; charset=utf-8"),
                ("Content-Disposition", f'attachment; filename="{name}.csv"'),
                ("Cache-Control", "no-store"),
                ("X-Content-Type-Options", "nosniff"),
            ],
        )
        return self._csv_chunks(where, first, _prefix(environ))

    def _csv_chunks(
        self, where: AuditFilter, page: tuple[list[AuditEntry], int | None], prefix: str
    ) -> Iterator[bytes]:
        """The CSV, one chunk per page of records; no connection is held between chunks."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")  # RFC 4180; quotes what needs it
        writer.writerow(CSV_COLUMNS)
        entries, cursor = page
        while True:
            for row in self._action_rows(entries, prefix, undo=False):
                writer.writerow([_csv_cell(row.get(column)) for column in CSV_COLUMNS])
            yield out.getvalue().encode()
            out.seek(0)
            out.truncate()
            if cursor is None:
                return
            entries, cursor = self.applier.store.audit_page(where, before=cursor,
                                                            limit=CSV_CHUNK)

    def _trial(
        self, start_response: StartResponse, study_id: int, trial_id: int
    ) -> Iterable[bytes]:
        store = self.applier.store
        ref = store.trials([trial_id]).get(trial_id)
        if ref is None or ref.study_id != study_id:
            reason = f"study_id={study_id} has no trial with trial_id={trial_id}"
            return _json(start_response, "404 Not Found", {"reason": reason})
        note = store.notes(study_id, [trial_id]).get(trial_id, Note(0, ""))
        return _json(
            start_response,
            "200 OK",
            {
                "trial_id": ref.trial_id,
                "study_id": ref.study_id,
                "study_name": ref.study_name,
                "number": ref.number,
                "state": ref.state.name,
                "note": {"version": note.version, "body": note.body},
                "dry_run": self.applier.dry_run,
                "commands": self._commands(ref),
            },
        )

    def _changes(
        self, environ: WSGIEnvironment, start_response: StartResponse, study_id: int
    ) -> Iterable[bytes]:
        raw = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True).get("since")
        if raw is not None and (
            len(raw) != 1 or not PLAIN_ID.match(raw[0]) or int(raw[0]) > MAX_ID
        ):
            shown = raw[0] if len(raw) == 1 else raw
            reason = (
                f"since must be one integer from 0 to {MAX_ID} in plain digits (the latest "
                f"of the previous answer), not {shown!r}"
            )
            return _json(start_response, "400 Bad Request", {"reason": reason})
        self.live.check()
        feed = self.live.feed
        if raw is None:
            payload: dict[str, Any] = {"study_id": study_id, "since": None, "latest": feed.latest(),
                       "more": False, "changes": []}
            return _json(start_response, "200 OK", payload)
        since = int(raw[0])
        found = feed.after(since, CHANGES_LIMIT + 1)
        more = len(found) > CHANGES_LIMIT
        found = found[:CHANGES_LIMIT]
        payload = {
            "study_id": study_id,
            "since": since,
            "latest": found[-1].id if found else since,
            "more": more,
            "changes": [change.to_json() for change in found if change.study_id == study_id],
        }
        return _json(start_response, "200 OK", payload)

    def _commands(self, ref: TrialRef) -> dict[str, dict[str, Any]]:
        """What a note ending in each command would do to this trial, by the applier's rules.

        ``text`` is what a button appends to the note; ``action`` is the applier's verdict
        ("applied", "requested", "nothing to do" or "refused"), and ``allowed`` says whether
        the trial would change (or its worker be asked to change it).
        """
        applier = self.applier
        monitored = applier.monitors(ref.study_name)
        commands = {}
        for command in Command:
            text = command.value
            if not monitored:
                action, reason = "refused", f"study {ref.study_name!r} is outside --study"
            elif applier.parser.parse(text) is not command:
                action = "refused"
                reason = f"the configured patterns do not read {text!r} as {command.value}"
            else:
                decision = applier.preview(ref, command)
                action, reason = decision.action.value, decision.reason
            commands[command.value] = {
                "allowed": action in (Action.APPLY.value, Action.ASK.value),
                "action": action,
                "reason": reason,
                "text": text,
                "to": command.target.name,
            }
        return commands

    def _undo_refused(
        self, entry: AuditEntry, ref: TrialRef | None, *, superseded: bool
    ) -> str | None:
        """Why this action cannot be undone, or None when it can."""
        applier = self.applier
        if entry.id is None:
            return "this storage keeps no action ids"
        if entry.study_level:
            return "a stop is undone in the study's note: remove STOP (or Resume study)"
        if entry.undo:
            return "this action is itself an undo"
        if not entry.retroactive:
            return f"a trial ended while {entry.from_state.name} stays ended"
        if superseded:
            return "a newer action changed this trial"
        if ref is None:
            return "the trial no longer exists"
        if ref.state != entry.to_state:
            return f"the trial is {ref.state.name} now, not {entry.to_state.name}"
        if not applier.monitors(ref.study_name):
            return f"study {ref.study_name!r} is outside --study"
        if not applier.store.retroactive_supported:
            return "this storage cannot change a finished trial"
        if not applier.retroactive:
            return "retroactive changes are off (--active-only)"
        return None

    def _undo(
        self, environ: WSGIEnvironment, start_response: StartResponse, audit_id: int
    ) -> Iterable[bytes]:
        if not environ.get("CONTENT_TYPE", "").startswith("application/json"):
            reason = "send Content-Type: application/json (a plain form post is refused)"
            return _json(start_response, "415 Unsupported Media Type", {"reason": reason})
        store = self.applier.store
        entry = store.audit_entry(audit_id)
        if entry is None:
            reason = f"no action with id {audit_id}"
            return _json(start_response, "404 Not Found", {"reason": reason})
        newest = store.newest_audit_ids([entry.trial_id]).get(entry.trial_id, audit_id)
        superseded = newest > audit_id
        ref = store.trials([entry.trial_id]).get(entry.trial_id)
        refused = self._undo_refused(entry, ref, superseded=superseded)
        if refused is not None:
            return _json(start_response, "409 Conflict", {"reason": f"cannot undo: {refused}"})
        note = store.notes(entry.study_id, [entry.trial_id]).get(entry.trial_id, Note(0, ""))
        saved = Note(note.version + 1, self.applier.parser.strip(note.body))
        status, headers, _, body = self._save_note(environ, entry, saved)
        outcome = next((v for k, v in headers if k == OUTCOME_HEADER), None)
        if not status.startswith("204"):
            # The dashboard's answer, e.g. 409 when the note changed since we read it.
            passed = [(k, v) for k, v in headers if k.lower() in ("content-type", "content-length")]
            start_response(status, passed)
            return [body]
        payload = {
            "outcome": json.loads(outcome) if outcome else None,
            "note": {"version": saved.version, "body": saved.body},
        }
        extra = [(OUTCOME_HEADER, outcome)] if outcome else []
        return _json(start_response, "200 OK", payload, extra)

    def _bulk(
        self, environ: WSGIEnvironment, start_response: StartResponse, study_id: int
    ) -> Iterable[bytes]:
        """Prune, fail or undo many trials, each as one note save (bulk.py)."""
        if self.storage is None:
            return _json(start_response, "501 Not Implemented",
                         {"reason": "bulk actions need the storage (UiMiddleware(storage=...))"})
        try:
            payload = bulk.run(self.storage, self.applier, study_id, bulk.read_request(environ),
                               user=environ.get("REMOTE_USER") or None)
        except bulk.BulkError as exc:
            return _json(start_response, exc.status, {"reason": exc.reason})
        return _json(start_response, "200 OK", payload)

    def _stop(self, environ: WSGIEnvironment, start_response: StartResponse,
              study_id: int) -> Iterable[bytes]:
        """``GET|POST /hitl/api/studies/<study_id>/stop`` (study_stop.py has the rest).

        GET: ``{"stopped": bool, "stop": {"user", "at", "source", "note_version"} | null, ...}``.
        POST ``{"stop": true|false}``: writes STOP into the study's note, or takes it out, and
        saves the next version through the dashboard's ``PUT /api/studies/<id>/note`` on this same
        stack, so the click takes the path of a typed note (allow-list, audit). Answers
        ``{"outcome": ..., "note": ..., "stopped": bool}``, or the dashboard's 409 when the note
        changed meanwhile. It needs ``Content-Type: application/json``.
        """

        method = environ.get("REQUEST_METHOD", "GET")
        stops = study_stop.StudyStops(self.applier)
        if method in ("GET", "HEAD"):
            state = stops.state(study_id)
            if state is None:
                reason = f"there is no study with study_id={study_id}"
                return _json(start_response, "404 Not Found", {"reason": reason})
            return _json(start_response, "200 OK", state)
        if method != "POST":
            return _not_allowed(start_response, "GET, POST")
        if not environ.get("CONTENT_TYPE", "").startswith("application/json"):
            reason = "send Content-Type: application/json (a plain form post is refused)"
            return _json(start_response, "415 Unsupported Media Type", {"reason": reason})
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if length > 1024:
            return _json(start_response, "413 Request Entity Too Large",
                         {"reason": "the body is {\"stop\": true} or {\"stop\": false}"})
        try:
            request = json.loads(environ["wsgi.input"].read(length).decode("utf-8") or "null")
        except (ValueError, RecursionError):
            request = None
        if not isinstance(request, dict) or not isinstance(request.get("stop"), bool):
            reason = "the body must be {\"stop\": true} or {\"stop\": false}"
            return _json(start_response, "400 Bad Request", {"reason": reason})
        state = stops.state(study_id)
        if state is None:
            reason = f"there is no study with study_id={study_id}"
            return _json(start_response, "404 Not Found", {"reason": reason})
        note = Note(state["note"]["version"], state["note"]["body"])
        wanted: bool = request["stop"]
        body = study_stop.with_stop(note.body) if wanted else study_stop.without_stop(note.body)
        if study_stop.says_stop(note.body) == wanted:
            # The note says so already: nothing to save; apply it in case the sweep has not yet.
            outcome = stops.apply(study_id, source="note-save",
                                  user=environ.get("REMOTE_USER") or None)
            payload = {"outcome": outcome, "note": state["note"], "stopped": outcome["stopped"]}
            return _json(start_response, "200 OK", payload)
        saved = Note(note.version + 1, body)
        status, headers, _, answer = self._put_note(
            environ, f"/api/studies/{study_id}/note", saved)
        outcome_raw = next((v for k, v in headers if k == "X-Hitl-Outcome"), None)
        if not status.startswith("204"):
            passed = [(k, v) for k, v in headers if k.lower() in ("content-type", "content-length")]
            start_response(status, passed)
            return [answer]
        applied = json.loads(outcome_raw) if outcome_raw else None
        payload = {
            "outcome": applied,
            "note": {"version": saved.version, "body": saved.body},
            "stopped": bool(applied and applied.get("stopped")),
        }
        extra = [("X-Hitl-Outcome", outcome_raw)] if outcome_raw else []
        return _json(start_response, "200 OK", payload, extra)

    def _save_note(
        self, environ: WSGIEnvironment, entry: AuditEntry, note: Note
    ) -> tuple[str, list[tuple[str, str]], Any, bytes]:
        """Save the note as the dashboard would: through the wrapped app's note API."""
        return self._put_note(environ, f"/api/studies/{entry.study_id}/{entry.trial_id}/note",
                              note, {"hitl_pruner.undo": entry.id})

    def _put_note(
        self, environ: WSGIEnvironment, path: str, note: Note, extra: dict[str, Any] | None = None
    ) -> tuple[str, list[tuple[str, str]], Any, bytes]:
        """PUT a note (a trial's or a study's) to the dashboard's note API on this same stack,
        with this request's identity and origin (FORWARDED_KEYS)."""
        data = json.dumps({"version": note.version, "body": note.body}).encode()
        put: dict[str, Any] = {key: environ[key] for key in FORWARDED_KEYS if key in environ}
        put.update(
            {
                "REQUEST_METHOD": "PUT",
                "PATH_INFO": path,
                "QUERY_STRING": "",
                "CONTENT_TYPE": "application/json",
                "CONTENT_LENGTH": str(len(data)),
                "wsgi.input": io.BytesIO(data),
                **(extra or {}),
            }
        )
        return _capture(self.application, put)


def _inject(page: bytes, prefix: str) -> bytes:
    """Link our stylesheet and script at the top of the head, ahead of the dashboard's bundle.

    Deferred scripts run in document order, so ours wraps ``fetch`` before the bundle uses it.
    """
    tags = (
        f'<link rel="stylesheet" href="{prefix}/hitl/static/hitl.css">'
        f'<script defer src="{prefix}/hitl/static/hitl.js"></script>'
    ).encode()
    head = re.search(rb"<head\b[^>]*>", page, re.IGNORECASE)
    if head is None:
        logger.warning("the dashboard's page has no <head>; the hitl-pruner UI is not added")
        return page
    return page[: head.end()] + tags + page[head.end() :]


def _capture(
    app: WSGIApplication, environ: WSGIEnvironment
) -> tuple[str, list[tuple[str, str]], Any, bytes]:
    """Call a WSGI app and return its status, headers, exc_info and whole body."""
    captured: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        captured.update(status=status, headers=list(headers), exc_info=exc_info)
        return lambda data: None

    result = app(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return captured["status"], captured["headers"], captured["exc_info"], body


def _json(
    start_response: StartResponse,
    status: str,
    payload: dict[str, Any],
    extra: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    data = json.dumps(payload).encode()
    start_response(
        status,
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(data))),
            ("Cache-Control", "no-store"),
            *(extra or []),
        ],
    )
    return [data]


def _not_allowed(start_response: StartResponse, allow: str) -> list[bytes]:
    return _json(
        start_response, "405 Method Not Allowed",
        {"reason": f"method not allowed; use {allow}"}, [("Allow", allow)],
    )


def _prefix(environ: WSGIEnvironment) -> str:
    """The path prefix the app is served under, as a URL path ("" at the root)."""
    prefix = environ.get("SCRIPT_NAME", "").rstrip("/")
    if prefix and not prefix.startswith("/"):
        prefix = "/" + prefix
    return quote(prefix, safe="/-._~!$&'()*+,;=:@")


def _actions_query(
    environ: WSGIEnvironment, *, paged: bool
) -> tuple[AuditFilter, int | None, int] | str:
    """The filter, cursor and page size the query string asks for, or why it is refused."""
    query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
    known = ACTIONS_PARAMS if paged else tuple(p for p in ACTIONS_PARAMS if p != "limit")
    for name, values in query.items():
        if name not in known:
            extra = " (the CSV has every matching action)" if name == "limit" else ""
            return f"unknown parameter {name!r}{extra}; this takes {', '.join(known)}"
        if len(values) > 1:
            return f"give {name} once, not {len(values)} times"
    # From a form, an empty field means "any".
    given = {name: values[0] for name, values in query.items() if values[0] != ""}
    numbers: dict[str, int | None] = {}
    for name, what in (("study", "a study id"), ("trial", "a trial number"),
                       ("before", "a cursor (the \"next\" of the previous page)")):
        raw = given.get(name)
        if raw is not None and (not PLAIN_ID.match(raw) or int(raw) > MAX_ID):
            return f"{name} must be {what}, an integer from 0 to {MAX_ID} in plain digits, " \
                   f"not {raw!r}"
        numbers[name] = int(raw) if raw is not None else None
    if numbers["trial"] is not None and numbers["study"] is None:
        return "trial needs study: trial numbers count within a study"
    user = given.get("user")
    if user is not None and len(user) > USER_MAX:
        return f"user must be at most {USER_MAX} characters, not {len(user)}"
    action = given.get("action")
    if action is not None and action not in AUDIT_ACTIONS:
        return f"action must be one of {', '.join(AUDIT_ACTIONS)}, not {action!r}"
    limit = DEFAULT_LIMIT
    if paged and "limit" in query:
        raw = query["limit"][0]
        limit = int(raw) if PLAIN_ID.match(raw) and len(raw) < 6 else 0
        if not 1 <= limit <= MAX_LIMIT:
            return f"limit must be an integer from 1 to {MAX_LIMIT}, not {raw!r}"
    where = AuditFilter(study_id=numbers["study"], trial_number=numbers["trial"], user=user,
                        action=action)
    return where, numbers["before"], limit


def _csv_cell(value: object) -> object:
    """A CSV cell: text a spreadsheet would run as a formula gets a leading ', so it stays text."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value
