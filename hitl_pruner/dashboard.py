"""Every optuna-dashboard internal we rely on, in one place, each with a test of its own.

The tested range is pinned in pyproject.toml; tests/test_dashboard_internals.py fails loudly
when an upgrade moves one of these.
"""

from __future__ import annotations

from typing import Any

from optuna.artifacts import FileSystemArtifactStore
from optuna.storages import BaseStorage
import optuna_dashboard

# The keys of a trial's note in the study's system attrs.
from optuna_dashboard._note import note_str_key_prefix
from optuna_dashboard._note import note_ver_key

__all__ = ["create", "forget_study", "note_str_key_prefix", "note_ver_key"]


def create(storage: BaseStorage, artifact_dir: str | None) -> Any:
    artifact_store = FileSystemArtifactStore(artifact_dir) if artifact_dir else None
    return optuna_dashboard.wsgi(storage, artifact_store)


def forget_study(app: Any, study_id: int) -> None:
    """Drop the dashboard's in-memory copy of a study's trials, so its next read is fresh."""
    cache = app._inmemory_cache
    with cache._trials_cache_lock:
        cache._trials_cache.pop(study_id, None)
        cache._trials_last_fetched_at.pop(study_id, None)
    with cache._cached_extra_study_property_cache_lock:
        cache._cached_extra_study_property_cache.pop(study_id, None)
