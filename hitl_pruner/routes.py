"""The dashboard's state-changing routes, in the one spelling of each that we let through.

optuna-dashboard routes with bottle, which does not read a path the way a regular expression
on ``PATH_INFO`` does: it decodes ``PATH_INFO`` once more (the server's latin-1 characters as
UTF-8 bytes, silently dropping bytes that are not UTF-8), strips trailing slashes, upper-cases
the method, and its ``int`` filter takes any Unicode digit after an optional minus sign. So to
the dashboard ``POST /api/trials/%EF%BC%95/tell`` is the tell of trial 5 (a fullwidth 5), and
``PUT /api/studies/1/-2/note`` the note of a trial -2 that does not exist.

We do not imitate that reading to decide what to check. A request with a method other than
GET, HEAD or OPTIONS passes only when it names one of the dashboard's state-changing routes in
its plain form (:func:`mutating_route`): the method in upper case, an ASCII path, each id
written ``0`` or ``[1-9][0-9]*`` and below 2**63 (the databases' integer), trailing slashes
as the dashboard strips them. In that form bottle reads the path exactly as we do, so the
route we check is the route that runs. Any other spelling is refused before the dashboard.
"""

from __future__ import annotations

import re

# Ids are stored as 64-bit integers; SQLite cannot even compare with a larger one.
MAX_ID = 2**63 - 1
ID = r"(0|[1-9][0-9]{0,18})"
# optuna-dashboard makes artifact and preference-history ids with uuid4.
UUID = r"[0-9a-fA-F-]+"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
PLAIN_FORM = (
    "a request that may change state is accepted only in its plain form: an upper-case "
    f"method, an ASCII path, ids in ASCII digits without sign or leading zeros, at most {MAX_ID}"
)

TRIAL_NOTE = "trial note"
TELL = "tell"


def _route(path: str) -> re.Pattern[str]:
    # \Z, not $: a $ would also match before a final newline.
    return re.compile("^" + path.format(id=ID, uuid=UUID) + r"/*\Z")


# Every route of optuna-dashboard 0.21 for a method other than GET/HEAD (_app.py,
# artifact/_backend.py, llm/_api_views.py, _rdb_migration.py), as (method, name, path).
MUTATING: tuple[tuple[str, str, re.Pattern[str]], ...] = (
    ("PUT", TRIAL_NOTE, _route("/api/studies/{id}/{id}/note")),
    ("POST", TELL, _route("/api/trials/{id}/tell")),
    ("POST", "create study", _route("/api/studies")),
    ("POST", "rename study", _route("/api/studies/{id}/rename")),
    ("DELETE", "delete study", _route("/api/studies/{id}")),
    ("PUT", "study note", _route("/api/studies/{id}/note")),
    ("POST", "report preference", _route("/api/studies/{id}/preference")),
    ("PUT", "feedback component", _route("/api/studies/{id}/preference_feedback_component")),
    ("DELETE", "remove preference", _route("/api/studies/{id}/preference/{uuid}")),
    ("POST", "restore preference", _route("/api/studies/{id}/preference/{uuid}")),
    ("POST", "user attrs", _route("/api/trials/{id}/user-attrs")),
    ("POST", "skip trial", _route("/api/studies/{id}/{id}/skip")),
    ("POST", "trial artifact", _route("/api/artifacts/{id}/{id}")),
    ("POST", "study artifact", _route("/api/artifacts/{id}")),
    ("DELETE", "delete trial artifact", _route("/api/artifacts/{id}/{id}/{uuid}")),
    ("DELETE", "delete study artifact", _route("/api/artifacts/{id}/{uuid}")),
    ("POST", "llm", _route("/api/llm/(?:trial_filter_query|generate_plotly_graph_query"
                           "|re_generate_plotly_graph_query)")),
    ("POST", "migrate schema", _route("/incompatible-rdb-schema")),
)


def ids(pattern: re.Pattern[str], path: str) -> tuple[int, ...] | None:
    """The ids a canonical pattern (groups of ``ID``) finds in the path, if all fit the database."""
    match = pattern.match(path)
    if match is None:
        return None
    found = tuple(int(group) for group in match.groups())
    return found if all(i <= MAX_ID for i in found) else None


def mutating_route(method: str, path: str) -> tuple[str, tuple[int, ...]] | None:
    """The dashboard route a state-changing request names in plain form, and its ids; or None."""
    for route_method, name, pattern in MUTATING:
        if method == route_method:
            found = ids(pattern, path)
            if found is not None:
                return name, found
    return None


def dashboard_path(path_info: str) -> str | None:
    """``PATH_INFO`` as the dashboard's router matches it (bottle's decoding, no trailing ``/``).

    None when it is not a WSGI string (characters above U+00FF), which bottle cannot decode.
    """
    try:
        return path_info.encode("latin-1").decode("utf-8", "ignore").rstrip("/") or "/"
    except UnicodeEncodeError:
        return None

