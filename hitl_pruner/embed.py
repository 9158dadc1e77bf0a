"""``hitl_pruner.wsgi(storage, artifact_store=None, *, llm_provider=None, **options)``: the
library API, shaped like ``optuna_dashboard.wsgi``.

It takes what ``optuna_dashboard.wsgi`` takes (a storage object or URL, any Optuna artifact
store, an LLM provider) and our options as keyword arguments, named as in the settings table,
and returns the whole served stack. It reads no environment: ``wsgi.py``, ``serve`` and the
gunicorn hooks are the adapters that do (from_env.py, cli.py).

A storage URL is opened exactly as optuna-dashboard opens it (``get_storage``: an RDB URL, a
journal file's path, a ``redis://`` URL): no tables are created. ``create_app`` (app.py), for
the servers, opens its URL itself and creates them.

Every layer passes the dashboard's attributes through, so code written for the bottle.Bottle
that ``optuna_dashboard.wsgi`` returns (``app.route``, ``app._inmemory_cache`` ...) works on
ours; so do ours (``app.sweeper``, ``app.start_background`` ...).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any
from typing import Callable
from typing import Iterable
from typing import Mapping

from optuna.storages._cached_storage import _CachedStorage

from . import auth
from . import dashboard
from . import origin
from .app import build_stack
from .commands import PatternError
from .commands import compile_pattern
from .config import ConfigError
from .config import Settings
from .notify import check_url
from .origin import CrossOriginGuard
from .prefix import ProxyMiddleware
from .prefix import clean_prefix

# Settings that belong to whoever opens the storage or listens, not to the application: what
# to do instead of each.
ELSEWHERE = {
    "storage_url": "give the storage (an object or a URL) as the first argument",
    "db_url": "give the storage (an object or a URL) as the first argument",
    "db_password": "open the storage yourself (optuna.storages.RDBStorage(url)) and pass it",
    "cert_path": "open the storage yourself with the driver's TLS arguments "
    "(RDBStorage(url, engine_kwargs={'connect_args': ...})) and pass it",
    "artifact_dir": "pass artifact_store=optuna.artifacts.FileSystemArtifactStore(path)",
    "host": "your WSGI server listens; this returns the application",
    "port": "your WSGI server listens; this returns the application",
    "public": "your WSGI server listens; this returns the application",
    "browser_path": "a setting of `python -m hitl_pruner serve` only",
    "thorium_app": "a setting of `python -m hitl_pruner serve` only",
    "verbose": "set the level of the 'hitl_pruner' logger with the logging module",
    "study": "the option is called studies=[...]",
    "active_only": "pass retroactive=False",
    "all_trials": "retroactive=True is the default",
    "basic_auth_file": "read the file and pass basic_auth=[line, ...]",
}


def _number(name: str, value: Any, *, minimum: float, strict: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name}={value!r}: give a number of seconds, e.g. {name}=10")
    if value < minimum or (strict and value == minimum):
        need = "more than" if strict else "at least"
        raise ConfigError(f"{name}={value!r}: give a number of seconds {need} {minimum:g}")
    return float(value)


def _interval(value: Any) -> float:
    return _number("interval", value, minimum=0, strict=True)


def _grace(value: Any) -> float | None:
    return None if value is None else _number("grace", value, minimum=0, strict=False)


def _names(name: str, value: Any, example: str) -> tuple[str, ...]:
    # A lone string is refused: "a,b" would be one name with a comma in it, not two names.
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ConfigError(f"{name}={value!r}: give a list of strings, e.g. {name}=[{example}]")
    items = tuple(value)
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise ConfigError(
                f"{name}: {item!r} is not a name; give a list of strings, e.g. {name}=[{example}]"
            )
    return items


def _studies(value: Any) -> tuple[str, ...]:
    return _names("studies", value, "'my-study'")


def _allowed_users(value: Any) -> tuple[str, ...] | None:
    return None if value is None else _names("allowed_users", value, "'alice', 'bob'")


def _pattern(name: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}={value!r}: give a regular expression as a string")
        try:
            compile_pattern(value, f"{name}=")
        except PatternError as exc:
            raise ConfigError(str(exc)) from None
        return value

    return check


def _flag(name: str) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}={value!r}: give True or False")
        return value

    return check


def _basic_auth(value: Any) -> tuple[tuple[str, str], ...]:
    """{user: hash}, or ``user:hash`` lines (as in --basic-auth-file), or (user, hash) pairs."""
    hint = (
        "give {'alice': hash} or ['alice:HASH'], each hash from "
        "hitl_pruner.auth.hash_password(password) or `python -m hitl_pruner hash-password USER`"
    )
    if value is None:
        return ()
    if isinstance(value, Mapping):
        lines = [f"{user}:{stored}" for user, stored in value.items()]
    elif isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ConfigError(f"basic_auth: {hint}")
    else:
        lines = [_credentials_line(item) for item in value]
    try:
        return auth.parse_credentials(lines, "basic_auth")
    except ValueError as exc:
        raise ConfigError(f"{exc}; {hint}") from None


def _credentials_line(item: Any) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, tuple) and len(item) == 2:
        return f"{item[0]}:{item[1]}"
    return "?"  # parse_credentials refuses it, naming the entry


def _user_header(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not auth.HEADER_NAME.match(value):
        raise ConfigError(f"user_header={value!r} is not a header name; give e.g. X-Remote-User")
    return value


def _forwarded_allow_ips(value: Any) -> tuple[str, ...]:
    text = value if isinstance(value, str) else ",".join(_names(
        "forwarded_allow_ips", value, "'10.0.0.0/8'"
    ))
    try:
        return auth.parse_networks(text)
    except ValueError as exc:
        raise ConfigError(
            f"forwarded_allow_ips: {exc}; give addresses or networks, e.g. ['10.0.0.0/8'], or '*'"
        ) from None


def _checked_each(name: str, check: Callable[[str], str], example: str) -> Callable[[Any], Any]:
    def each(value: Any) -> tuple[str, ...]:
        try:
            return tuple(check(item) for item in _names(name, value, example))
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}; give e.g. {name}=[{example}]") from None

    return each


def _root_path(value: Any) -> str:
    cleaned = clean_prefix(value) if isinstance(value, str) else None
    if cleaned is None:
        raise ConfigError(
            f"root_path={value!r}: give a path like '/optuna' (letters, digits, -._~)"
        )
    return cleaned


def _notify_url(value: Any) -> str | None:
    if value is None:
        return None
    try:
        return check_url(value) if isinstance(value, str) else check_url(repr(value))
    except ValueError as exc:
        raise ConfigError(f"notify_url: {exc}") from None


# Each keyword option: its check, which returns the Settings value.
OPTIONS: dict[str, Callable[[Any], Any]] = {
    "interval": _interval,
    "grace": _grace,
    "studies": _studies,
    "prune_pattern": _pattern("prune_pattern"),
    "fail_pattern": _pattern("fail_pattern"),
    "dry_run": _flag("dry_run"),
    "retroactive": _flag("retroactive"),
    "basic_auth": _basic_auth,
    "user_header": _user_header,
    "forwarded_allow_ips": _forwarded_allow_ips,
    "allowed_users": _allowed_users,
    "allowed_hosts": _checked_each("allowed_hosts", origin.normalize_host, "'optuna.example.org'"),
    "trusted_origins": _checked_each(
        "trusted_origins", origin.normalize_origin, "'https://tools.example.org'"
    ),
    "root_path": _root_path,
    "notify_url": _notify_url,
    "apply_existing_notes": _flag("apply_existing_notes"),
}


def settings_from(options: Mapping[str, Any]) -> Settings:
    """Settings from ``wsgi()``'s keyword options: TypeError for a name that is none of them,
    ConfigError (a ValueError) saying how to fix a value."""
    for name in options:
        if name in OPTIONS:
            continue
        if name in ELSEWHERE:
            raise TypeError(f"hitl_pruner.wsgi() takes no option {name!r}: {ELSEWHERE[name]}")
        close = difflib.get_close_matches(name, [*OPTIONS, "autostart"], n=3, cutoff=0.6)
        raise TypeError(
            f"hitl_pruner.wsgi() got an unexpected keyword argument {name!r}"
            + (f"; did you mean {' or '.join(map(repr, close))}?" if close else "")
            + f" (its options: {', '.join(sorted([*OPTIONS, 'autostart', 'llm_provider']))})"
        )
    values = {name: OPTIONS[name](value) for name, value in options.items()}
    if values.get("basic_auth") and values.get("user_header"):
        raise ConfigError(
            "basic_auth and user_header exclude each other: a proxy names the user, or this "
            "server asks for a password; give one"
        )
    if "allowed_users" in values and values["allowed_users"] == ():
        values["allowed_users"] = None  # as the settings read it: nobody listed, everyone's
    return dataclasses.replace(Settings(storage_url=""), **values)


def wsgi(
    storage: Any,
    artifact_store: Any = None,
    *,
    llm_provider: Any = None,
    autostart: bool = True,
    **options: Any,
) -> CrossOriginGuard | ProxyMiddleware:
    """optuna-dashboard for ``storage`` where a human's PRUNE or FAIL note ends the trial.

    Args:
        storage: an Optuna storage (RDBStorage, JournalStorage, InMemoryStorage ...) or a URL,
            opened as ``optuna_dashboard.wsgi`` opens it.
        artifact_store: any Optuna artifact store (FileSystemArtifactStore,
            Boto3ArtifactStore, GCSArtifactStore), handed to the dashboard.
        llm_provider: handed to the dashboard.
        autostart: start the sweep on the first request in each process (False: call
            ``app.start_background()``, or run ``app.sweeper.run_once()`` by hand).
        **options: the settings table's names: ``interval``, ``grace``, ``studies``,
            ``prune_pattern``, ``fail_pattern``, ``dry_run``, ``retroactive``, ``basic_auth``,
            ``user_header``, ``forwarded_allow_ips``, ``allowed_users``, ``allowed_hosts``,
            ``trusted_origins``, ``root_path``, ``notify_url`` (a webhook told of every
            human action, notify.py), ``apply_existing_notes``.

    Returns:
        The WSGI application: our layers around the dashboard's bottle.Bottle, whose
        attributes they pass through. With ``root_path``, it serves under that path.

    Raises:
        TypeError: an option that does not exist (the message names close ones).
        ConfigError: a value that is wrong, or a storage that cannot be used; the message
            says how to fix it. (A ValueError.)
    """
    if not isinstance(autostart, bool):
        raise ConfigError(f"autostart={autostart!r}: give True or False")
    settings = settings_from(options)
    try:
        opened = dashboard.get_storage(storage)
    except ValueError as exc:
        raise ConfigError(
            f"cannot open the storage {storage!r} as optuna-dashboard would: {exc}"
        ) from None
    if isinstance(opened, _CachedStorage):
        # A study's own storage (``study._storage``) keeps finished trials in this process:
        # the server must read what other processes write, and write past that cache.
        opened = opened._backend
    application = build_stack(
        opened, settings, artifact_store=artifact_store, llm_provider=llm_provider,
        autostart=autostart,
    )
    if not settings.root_path:
        return application
    # The dashboard's pages and bundle under the path (prefix.py), as `--root-path` serves them.
    return ProxyMiddleware(
        application, trusted=settings.forwarded_allow_ips, root_path=settings.root_path
    )
