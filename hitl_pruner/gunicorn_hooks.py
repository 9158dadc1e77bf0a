"""gunicorn's side of hitl-pruner: the settings gunicorn takes from ours, and the hooks.

``gunicorn_settings()`` is what a gunicorn config file (``./gunicorn.conf.py``,
``scripts/gunicorn.conf.py``) takes from hitl-pruner's settings, resolved by ``config.resolve``
exactly as ``wsgi:app`` resolves them (HITL_* variables, HITL_CONFIG's TOML file):

``forwarded_allow_ips``
    gunicorn believes ``X-Forwarded-Proto: https`` and a ``SCRIPT_NAME`` header only from these
    addresses; hitl-pruner believes its ``X-Forwarded-*`` headers and the user header only from
    the same ones. Two lists would let a client gunicorn trusts and we do not move the whole
    site under a prefix of its choosing.
``bind``
    ``host:port`` (default 127.0.0.1:8080, as for ``serve``); ``-b`` on gunicorn's command line
    still wins.

``serve`` uses ``trusted_proxies`` and ``bind_address`` on the same Settings.

The hooks run one sweep per worker process, started after the fork. Threads do not survive
fork(), so under ``--preload`` a sweep started at import would run in the master only. The
middleware also starts the sweep on a process's first request as a fallback. They also keep what
the master and each worker built to serve out of the garbage collector's passes (``gc.freeze``).

An exception in a config file or a hook halts gunicorn, so none of these raise, but for one
deliberate stop: ``post_worker_init`` exits with code 4 (gunicorn halts, and does not respawn
the worker) when gunicorn trusts other proxies than the application does, e.g. after a
``--forwarded-allow-ips`` on gunicorn's command line, which overrides the config file.
"""

from __future__ import annotations

import gc
import ipaddress
import logging
from typing import Any
from typing import Iterable
from typing import Mapping

from .config import Settings
from .config import resolve
from .notify import flush_all

# Seconds a stopping worker waits for its queued --notify-url messages.
WORKER_EXIT_FLUSH = 2.0

logger = logging.getLogger(__name__)


def trusted_proxies(settings: Settings) -> str:
    """gunicorn's ``forwarded_allow_ips`` for ``settings.forwarded_allow_ips``."""
    return ",".join(_networks(settings.forwarded_allow_ips))


def _networks(items: Iterable[str]) -> list[str]:
    # gunicorn refuses a network with host bits set (10.0.0.1/8), which ours reads as the
    # network it lies in (10.0.0.0/8): each is written out as that network.
    return [
        item if item == "*" else str(ipaddress.ip_network(item, strict=False)) for item in items
    ]


def bind_address(settings: Settings) -> str:
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"{host}:{settings.port}"


def gunicorn_settings(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``forwarded_allow_ips`` and ``bind`` for a gunicorn config file; see the module doc."""
    try:
        settings = resolve(environ=environ)
        return {"forwarded_allow_ips": trusted_proxies(settings), "bind": bind_address(settings)}
    except Exception:
        # A wrong setting: wsgi:app stops the server with a line saying what to fix. Until then
        # gunicorn trusts no proxy, and listens on a free loopback port, so that no port in use
        # hides that line behind "Address already in use".
        return {"forwarded_allow_ips": "", "bind": "127.0.0.1:0"}


def post_worker_init(worker: Any) -> None:
    _check_trust(worker)
    try:
        start = getattr(worker.wsgi, "start_background", None)
        if start is not None:
            start()
    except Exception:
        logger.exception("could not start the sweep in worker %s", worker.pid)
    # What the worker built to serve (the imports, the dashboard, the storage) lives as long as
    # the worker: leave it out of the garbage collector's passes from now on. Each full pass while
    # serving then walks only what requests made, and the exit skips the pass over it all
    # (about 0.2 s of CPU per worker stop measured).
    gc.freeze()


def pre_fork(server: Any, worker: Any) -> None:
    # The master's objects, before each fork: as Python's gc documentation advises for a server
    # that forks, a worker's collections then do not write to the pages it shares with the
    # master, and the master's exit skips the pass over them.
    gc.freeze()


def _check_trust(worker: Any) -> None:
    """Exit 4 when gunicorn trusts other proxies than hitl-pruner: ``--forwarded-allow-ips``
    or ``-e HITL_FORWARDED_ALLOW_IPS`` on gunicorn's command line reaches only one of them."""
    try:
        ours = getattr(worker.wsgi, "trusted", None)
        if ours is None:  # not our application
            return
        theirs = list(worker.cfg.forwarded_allow_ips)
        if set(_networks(ours)) == set(_networks(theirs)):
            return
    except Exception:
        logger.exception("could not compare the trusted proxies in worker %s", worker.pid)
        return
    logger.error(
        "gunicorn trusts forwarded headers from %s, hitl-pruner from %s: set "
        "HITL_FORWARDED_ALLOW_IPS where gunicorn starts (gunicorn.conf.py hands it to gunicorn), "
        "not gunicorn's --forwarded-allow-ips or -e; for an application made by "
        "hitl_pruner.wsgi(), give gunicorn's --forwarded-allow-ips and its forwarded_allow_ips= "
        "the same addresses",
        ",".join(theirs) or "nobody", ",".join(ours) or "nobody",
    )
    raise SystemExit(4)


def worker_exit(server: Any, worker: Any) -> None:
    try:
        stop = getattr(getattr(worker, "wsgi", None), "stop_background", None)
        if stop is not None:
            stop()
    except Exception:
        logger.exception("could not stop the sweep in worker %s", worker.pid)
    try:
        # Messages to --notify-url still queued: a short, bounded wait (the audit has them).
        flush_all(WORKER_EXIT_FLUSH)
    except Exception:
        logger.exception("could not flush the notifications in worker %s", worker.pid)
