"""Every optuna-dashboard internal we rely on, in one place, each with a test of its own.

The tested range is pinned in pyproject.toml; tests/test_dashboard_internals.py fails loudly
when an upgrade moves one of these.
"""

from __future__ import annotations

import inspect
from typing import Any
from typing import Iterable

from optuna.artifacts import FileSystemArtifactStore
from optuna.storages import BaseStorage
import optuna_dashboard

# The keys of a trial's note in the study's system attrs.
from optuna_dashboard._note import note_str_key_prefix
from optuna_dashboard._note import note_ver_key

# How its note API saves a note: the version check, then version and text chunks.
from optuna_dashboard._note import save_note_with_version

# How it cuts a note's text into system attrs (of SYSTEM_ATTR_MAX_LENGTH characters).
from optuna_dashboard._note import split_body
from optuna_dashboard._note import version_is_incremented

# How optuna_dashboard.wsgi() turns a storage URL (or object) into a storage: an RDB URL, a
# journal file's path, a redis:// URL. The library API (embed.py) opens a URL the same way.
from optuna_dashboard._storage_url import get_storage

__all__ = [
    "create", "forget_study", "get_storage", "note_str_key_prefix", "note_ver_key",
    "refresh_trials", "save_note", "split_body",
]


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
