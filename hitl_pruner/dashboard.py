"""Every optuna-dashboard internal we rely on, in one place, each with a test of its own.

The tested range is pinned in pyproject.toml (0.19 to 0.21; scripts/test_matrix.sh runs the
oldest, scripts/test.sh the newest); tests/test_dashboard_internals.py fails loudly when an
upgrade moves one of these. What differs between those releases is in ``RELEASES``, chosen by
the installed version when this module is imported; any other release refuses to import it,
so a server never starts on internals nobody checked.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any
from typing import Iterable

from optuna.artifacts import FileSystemArtifactStore
from optuna.storages import BaseStorage
import optuna_dashboard

# How its note API saves a note: the version check, then version and text chunks.
from optuna_dashboard._note import save_note_with_version
from optuna_dashboard._note import version_is_incremented

# How optuna_dashboard.wsgi() turns a storage URL (or object) into a storage: an RDB URL, a
# journal file's path, a redis:// URL. The library API (embed.py) opens a URL the same way.
from optuna_dashboard._storage_url import get_storage

# The keys of a note in the study's system attrs, and how its text is cut into them: the same as
# optuna_dashboard._note's, in a module that does not import the dashboard (for the worker side).
from .notes import note_str_key_prefix
from .notes import note_ver_key
from .notes import split_body

__all__ = [
    "BUNDLE_API_BASE", "BUNDLE_ROUTER", "PAGE_CSP", "PAGE_CSP_ADDED", "RELEASE",
    "UnsupportedDashboard", "create", "forget_study", "get_storage", "known_release",
    "note_str_key_prefix", "note_ver_key", "refresh_trials", "save_note", "split_body",
]

# Its note keys, note API and trial cache (_inmemory_cache.py) are the same in every release
# below; so are its page (index.html) and its router's prefix in bundle.js.

# bundle.js compiles its router's prefix in (webpack's DefinePlugin: URL_PREFIX="/dashboard").
BUNDLE_ROUTER = b'url_prefix:"/dashboard"'

# How bundle.js gives its API client a base URL, as three groups: before, the default, after;
# prefix.prefixed_bundle puts the sub-path in the middle one (so a rewritten bundle matches too).
# 0.19 and 0.20: an axios client built with `new class{...}(API_ENDPOINT)`, API_ENDPOINT unset
# at build time, so `(void 0)`: requests go to "/api/...", relative to nothing.
_AXIOS_BASE = re.compile(
    rb'(this\.axiosInstance=[\w$]+\.create\(\{baseURL:e\}\)\}\}\()(void 0|"[^"]*")(\))'
)
# 0.21: a fetch client whose base is `API_ENDPOINT ?? ""` with trailing slashes trimmed.
_FETCH_BASE = re.compile(
    rb'(this\.baseURL=\(e=>\{[^}]*\}\)\(null!=e\?e:)("[^"]*")(\))'
)

# The Content-Security-Policy of its page (GET /dashboard...), as 0.20 and 0.21 send it when no
# LLM provider is configured (one adds 'unsafe-inline' to script-src).
_PAGE_CSP_0_20 = ";".join(
    [
        "default-src 'self'",
        "img-src 'self' data: blob:",
        "frame-src 'self'",
        "object-src 'none'",
        "connect-src 'self'",
        "style-src 'self' data: 'unsafe-inline'",
        "script-src 'self' 'unsafe-eval'",
    ]
)


@dataclasses.dataclass(frozen=True)
class Release:
    """What differs between the optuna-dashboard releases we know."""

    api_base: re.Pattern[bytes]
    # The policy its page is served with; None when it sends none (ui.py then adds 0.20's).
    page_csp: str | None


RELEASES = {
    # 0.19: no Content-Security-Policy on its page; and no LLM provider (create() refuses one).
    "0.19": Release(api_base=_AXIOS_BASE, page_csp=None),
    "0.20": Release(api_base=_AXIOS_BASE, page_csp=_PAGE_CSP_0_20),
    # 0.21: its API client moved from axios to fetch (another base-URL literal in bundle.js).
    "0.21": Release(api_base=_FETCH_BASE, page_csp=_PAGE_CSP_0_20),
}


class UnsupportedDashboard(ImportError):
    """The installed optuna-dashboard is not a release whose internals we know."""


def known_release(version: str) -> Release:
    """The ``RELEASES`` entry for an optuna-dashboard version, e.g. ``"0.20.0"``; raises
    :class:`UnsupportedDashboard`, saying what to install, for any other."""
    release = RELEASES.get(".".join(version.split(".")[:2]))
    if release is None:
        known = ", ".join(RELEASES)
        raise UnsupportedDashboard(
            f"hitl-pruner knows the internals of optuna-dashboard {known} (its note keys, trial "
            f"cache, page and bundle strings), not of the installed {version}: install "
            f"'optuna-dashboard>=0.19,<0.22'"
        )
    return release


RELEASE = known_release(optuna_dashboard.__version__)
BUNDLE_API_BASE = RELEASE.api_base
PAGE_CSP = RELEASE.page_csp
# The policy ui.py puts on the dashboard's page when the release sends none (0.19): the one 0.20
# introduced, so the page is held to the same policy on every release. None: it sends its own.
PAGE_CSP_ADDED = _PAGE_CSP_0_20 if PAGE_CSP is None else None


def create(storage: BaseStorage, artifact_store: Any = None, *, llm_provider: Any = None) -> Any:
    """``optuna_dashboard.wsgi(storage, artifact_store, llm_provider=...)``, a bottle.Bottle.

    ``artifact_store``: any Optuna artifact store (file system, Boto3, GCS), or a directory's
    path for a FileSystemArtifactStore (``--artifact-dir``), or None.
    """
    if isinstance(artifact_store, str):
        artifact_store = FileSystemArtifactStore(artifact_store)
    if llm_provider is None:
        return optuna_dashboard.wsgi(storage, artifact_store)
    if "llm_provider" not in inspect.signature(optuna_dashboard.wsgi).parameters:
        raise TypeError(
            f"llm_provider: optuna-dashboard {optuna_dashboard.__version__} installed here has "
            "no LLM support; upgrade optuna-dashboard, or leave llm_provider out"
        )
    return optuna_dashboard.wsgi(storage, artifact_store, llm_provider=llm_provider)


def forget_study(app: Any, study_id: int) -> None:
    """Drop the dashboard's in-memory copy of a study's trials, so its next read is fresh."""
    cache = app._inmemory_cache
    with cache._trials_cache_lock:
        cache._trials_cache.pop(study_id, None)
        cache._trials_last_fetched_at.pop(study_id, None)
    with cache._cached_extra_study_property_cache_lock:
        cache._cached_extra_study_property_cache.pop(study_id, None)


def refresh_trials(app: Any, storage: BaseStorage, study_id: int, trial_ids: Iterable[int], *,
                   search_space: bool) -> None:
    """Put fresh copies of these trials into the dashboard's cached list of the study's trials.

    Reading one trial is cheap; forgetting the study makes the dashboard read all its trials
    again, and on a study of 10k trials that costs seconds of CPU in every serving process.
    The cache's age is kept, so the dashboard refreshes as often as it would have.

    ``search_space``: the change can alter the study's search space and user attrs as the
    dashboard sums them up (a trial entered or left FAIL, whose params it leaves out). That sum
    only grows, so it is dropped and built again on the next read.
    """
    cache = app._inmemory_cache
    with cache._trials_cache_lock:
        cached = cache._trials_cache.get(study_id)
    if cached is not None:
        fresh = {trial_id: storage.get_trial(trial_id) for trial_id in set(trial_ids)}
        with cache._trials_cache_lock:
            if cache._trials_cache.get(study_id) is cached:
                # A new list: a request thread may be reading the old one.
                cache._trials_cache[study_id] = [fresh.get(t._trial_id, t) for t in cached]
            else:
                # Read again meanwhile, maybe before our change: let the next read be fresh.
                cache._trials_cache.pop(study_id, None)
                cache._trials_last_fetched_at.pop(study_id, None)
    if search_space:
        with cache._cached_extra_study_property_cache_lock:
            cache._cached_extra_study_property_cache.pop(study_id, None)


def save_note(storage: BaseStorage, study_id: int, trial_id: int, version: int, body: str) -> bool:
    """Save a trial's note as the dashboard's note API does (PUT .../note): only as the stored
    version + 1; False, saving nothing, when the note has another version by now (its 409)."""
    if not version_is_incremented(storage.get_study_system_attrs(study_id), trial_id, version):
        return False
    save_note_with_version(storage, study_id, trial_id, version, body)
    return True
