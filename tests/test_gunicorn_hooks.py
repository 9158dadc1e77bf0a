"""The gunicorn hooks keep what the master and each worker built to serve out of the garbage
collector's later passes (gc.freeze): cheaper full collections while serving, pages shared with
the master left unwritten, and a quick exit."""

from __future__ import annotations

import gc
from types import SimpleNamespace
from typing import Iterator

import pytest

from hitl_pruner import gunicorn_hooks


@pytest.fixture
def unfrozen() -> Iterator[None]:
    """This test process with nothing frozen, before and after (pytest freezes nothing)."""
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_the_master_freezes_what_it_built_before_each_fork(unfrozen: None) -> None:
    assert gc.get_freeze_count() == 0
    gunicorn_hooks.pre_fork(SimpleNamespace(), SimpleNamespace())
    assert gc.get_freeze_count() > 0


def test_a_worker_freezes_what_it_built_once_its_application_is_loaded(unfrozen: None) -> None:
    started: list[bool] = []
    # An application of ours as the hooks see it: the proxies it trusts, and its sweep's start.
    app = SimpleNamespace(trusted=[], start_background=lambda: started.append(True))
    worker = SimpleNamespace(wsgi=app, cfg=SimpleNamespace(forwarded_allow_ips=[]), pid=1)
    gunicorn_hooks.post_worker_init(worker)
    assert started == [True]
    assert gc.get_freeze_count() > 0
