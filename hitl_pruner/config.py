"""Settings: one frozen dataclass, resolved once from CLI > environment > TOML > defaults."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any
from typing import Callable
from typing import Literal
from typing import Mapping

import sqlalchemy as sa

from .commands import DEFAULT_FAIL_PATTERN
from .commands import DEFAULT_PRUNE_PATTERN
from .commands import PatternError
from .commands import compile_pattern
from .prefix import clean_prefix

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

logger = logging.getLogger(__name__)

ENV_PREFIX = "HITL_"
# The seed tool's layout: a CA file in ./cert is picked up without any flag.
DEFAULT_CERT = Path("cert") / "ca.pem"
DB_TYPES = ("postgresql", "mysql", "sqlite")
DRIVERS = {"postgresql": "postgresql+psycopg2", "mysql": "mysql+pymysql", "sqlite": "sqlite"}
DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306}
CertMode = Literal["auto", "use", "off"]


class ConfigError(ValueError):
    """A setting is wrong; the message says which one and how to fix it."""


@dataclasses.dataclass(frozen=True)
class Settings:
    storage_url: str = "sqlite:///optuna.db"
    host: str = "127.0.0.1"
    port: int = 8080
    # serve listens on a host that is not loopback only when told to: a few slow clients can
    # hold all its threads, where nginx in front reads each request whole first.
    public: bool = False
    # The path the dashboard is served under behind a proxy ("/optuna"), or "" (see prefix.py).
    root_path: str = ""
    studies: tuple[str, ...] = ()
    interval: float = 10.0
    # Seconds a worker using HumanInTheLoopPruner has to end its trial before the sweep forces
    # the state; None: three sweep intervals.
    grace: float | None = None
    prune_pattern: str = DEFAULT_PRUNE_PATTERN
    fail_pattern: str = DEFAULT_FAIL_PATTERN
    dry_run: bool = False
    retroactive: bool = True
    verbose: bool = False
    browser_path: str | None = None
    # serve opens the dashboard in a Chromium-family browser's app mode (launch.py).
    thorium_app: bool = False
    artifact_dir: str | None = None
    cert_path: str | None = None
    # The database password, kept apart from storage_url so no repr or log line shows it.
    db_password: str | None = dataclasses.field(default=None, repr=False)
    # Who may act (auth.py): ((user, password hash), ...) for HTTP basic auth; the header a
    # trusted proxy names the user in, and the proxies' addresses; the users whose commands
    # are applied (None: everyone's).
    basic_auth: tuple[tuple[str, str], ...] = dataclasses.field(default=(), repr=False)
    user_header: str | None = None
    forwarded_allow_ips: tuple[str, ...] = ("127.0.0.1",)
    allowed_users: tuple[str, ...] | None = None
    # Browsers (origin.py): the host names we answer state-changing requests under, besides IP
    # addresses and localhost; the other sites' origins allowed to send them.
    allowed_hosts: tuple[str, ...] = ()
    trusted_origins: tuple[str, ...] = ()
    # A webhook told of every human action (notify.py); its path is a secret: not in the repr.
    notify_url: str | None = dataclasses.field(default=None, repr=False)
    # On the first start, apply the commands already in finished trials' notes (sweep.py).
    apply_existing_notes: bool = False

    @property
    def grace_seconds(self) -> float:
        return 3 * self.interval if self.grace is None else self.grace

    @property
    def url(self) -> sa.URL | None:
        """The SQLAlchemy URL with the password filled in; None for a journal file."""
        if "://" not in self.storage_url:
            return None
        url = sa.make_url(self.storage_url)
        return url.set(password=self.db_password) if self.db_password is not None else url

    @property
    def display_url(self) -> str:
        url = self.url
        return url.render_as_string(hide_password=True) if url is not None else self.storage_url

    def connect_args(self) -> dict[str, Any]:
        url = self.url
        if self.cert_path is None or url is None:
            return {}
        if url.get_backend_name() == "postgresql":
            return {"sslmode": "verify-full", "sslrootcert": self.cert_path}
        if url.get_backend_name() == "mysql":
            return {"ssl_ca": self.cert_path, "ssl_verify_cert": True, "ssl_verify_identity": True}
        return {}


@dataclasses.dataclass(frozen=True)
class _Option:
    name: str  # Settings field, TOML key and (upper-cased) HITL_ variable
    parse: Callable[[str], Any]
    doc: str


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("use 1/0, true/false, yes/no or on/off")


def _studies(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


# Raw inputs: what a user can set. Settings fields are computed from them in resolve().
OPTIONS = [
    _Option("storage_url", str, "Storage URL (sqlalchemy URL, or a journal file path)"),
    _Option("db_url", str, "Same as storage_url (the seed tool's name)"),
    _Option("db_type", str, "postgresql, mysql or sqlite, used with the db_* parts"),
    _Option("db_host", str, "Database host (default localhost)"),
    _Option("db_port", int, "Database port (default 5432 / 3306)"),
    _Option("db_name", str, "Database name, or SQLite file stem (default optuna)"),
    _Option("db_user", str, "Database user (default optuna)"),
    _Option("db_password", str, "Database password"),
    _Option("db_password_file", str, "File whose first line is the database password"),
    _Option("cert_path", str, "CA certificate for TLS to the database"),
    _Option("cert", str, "auto (default), use or off: whether to use the CA certificate"),
    _Option("host", str, "Address to listen on (serve, and gunicorn.conf.py; default 127.0.0.1)"),
    _Option("port", int, "Port to listen on (default 8080)"),
    _Option("public", _bool, "serve: listen on a --host that is not loopback, without nginx "
            "in front (slow clients can hold up the server)"),
    _Option("root_path", str, "Path prefix the proxy serves us under, e.g. /optuna (default: "
            "none, or a trusted proxy's SCRIPT_NAME or X-Forwarded-Prefix)"),
    _Option("study", _studies, "Only these studies (comma-separated in the environment)"),
    _Option("interval", float, "Seconds between sweeps (default 10)"),
    _Option("grace", float, "Seconds a cooperative worker has before the state is forced "
            "(default 3 x interval)"),
    _Option("prune_pattern", str,
            "Regex for a PRUNE command (default: the word PRUNE standing alone)"),
    _Option("fail_pattern", str,
            "Regex for a FAIL command (default: the word FAIL standing alone)"),
    _Option("dry_run", _bool, "Log what would change, change nothing"),
    _Option("active_only", _bool, "Only RUNNING/WAITING trials: no retroactive relabels"),
    _Option("all_trials", _bool, "Retroactive relabels on (the default; seed tool's flag)"),
    _Option("verbose", _bool, "Debug logging"),
    _Option("browser_path", str, "Browser to open on the dashboard (serve only)"),
    _Option("thorium_app", _bool, "Open the dashboard in app mode of a Chromium-family browser "
            "found on PATH (serve only)"),
    _Option("artifact_dir", str, "Directory of a FileSystemArtifactStore for the dashboard"),
    _Option("basic_auth_file", str, "File of user:hash lines: HTTP basic auth on every request "
            "(hashes from `python -m hitl_pruner hash-password USER`)"),
    _Option("basic_auth", str, "Same as basic_auth_file, inline: user:hash,user:hash"),
    _Option("user_header", str, "Header a trusted proxy names the user in (e.g. X-Remote-User)"),
    _Option("forwarded_allow_ips", str, "Proxy addresses trusted with forwarded headers "
            "(gunicorn's too) and the user header, comma-separated, or * (default 127.0.0.1)"),
    _Option("allowed_users", _studies, "Only these users' commands are applied "
            "(comma-separated; default: everyone's)"),
    _Option("allowed_hosts", _studies, "Host names the server is reached under, besides IP "
            "addresses and localhost (comma-separated, or *; default: none)"),
    _Option("trusted_origins", _studies, "Other sites' origins allowed to change state, e.g. "
            "https://tools.example.org (comma-separated; default: none)"),
    _Option("notify_url", str, "http(s) URL that gets a JSON POST (Slack webhook shape) per "
            "human action (default: none)"),
    _Option("apply_existing_notes", _bool, "On the first start, also relabel finished trials "
            "whose notes already carry a command (default: list them, change nothing)"),
]
_BY_NAME = {o.name: o for o in OPTIONS}


def env_name(option: str) -> str:
    return ENV_PREFIX + option.upper()


def from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    known = {env_name(o.name) for o in OPTIONS} | {env_name("config")}
    for key in environ:
        if key.startswith(ENV_PREFIX) and key not in known and not key.startswith("HITL_TEST_"):
            logger.warning("ignoring unknown environment variable %s", key)
    for option in OPTIONS:
        raw = environ.get(env_name(option.name))
        if raw is None:
            continue
        try:
            values[option.name] = option.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{env_name(option.name)}={raw!r} is not valid: {exc}") from None
    return values


def from_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    data = data.get("hitl_pruner", data)
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in _BY_NAME:
            raise ConfigError(
                f"config file {path}: unknown setting {key!r}; known settings: "
                + ", ".join(sorted(_BY_NAME))
            )
        if name == "study" and isinstance(value, str):
            value = (value,)
        elif name == "study":
            value = tuple(str(v) for v in value)
        values[name] = value
    return values


def resolve(
    cli: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Merge the sources (CLI > environment > TOML > defaults) and check the result."""
    cli = {k: v for k, v in (cli or {}).items() if v is not None}
    environ = os.environ if environ is None else environ
    env = from_env(environ)
    config_file = cli.pop("from_config", None) or environ.get(env_name("config"))
    merged = {**(from_toml(config_file) if config_file else {}), **env, **cli}
    return _build(merged)


def _build(raw: dict[str, Any]) -> Settings:
    for pattern_flag in ("prune_pattern", "fail_pattern"):
        if pattern_flag in raw:
            try:
                compile_pattern(raw[pattern_flag], "--" + pattern_flag.replace("_", "-"))
            except PatternError as exc:
                raise ConfigError(str(exc)) from None

    if raw.get("active_only") and raw.get("all_trials"):
        raise ConfigError("--active-only and --all-trials contradict each other: give one")
    interval = float(raw.get("interval", 10.0))
    if not interval > 0:
        raise ConfigError(f"--interval must be a positive number of seconds, not {interval}")
    grace = float(raw["grace"]) if raw.get("grace") is not None else None
    if grace is not None and not grace >= 0:
        raise ConfigError(f"--grace must be a number of seconds, 0 or more, not {grace}")
    port = int(raw.get("port", 8080))
    if not 0 < port < 65536:
        raise ConfigError(f"--port must be between 1 and 65535, not {port}")
    root_path = clean_prefix(str(raw.get("root_path", "")))
    if root_path is None:
        raise ConfigError(
            f"--root-path must be a path like /optuna (letters, digits, -._~), "
            f"not {raw['root_path']!r}"
        )

    password = raw.get("db_password")
    if password is None and raw.get("db_password_file"):
        password = _read_password(raw["db_password_file"])
    storage_url = _storage_url(raw)
    settings = Settings(
        storage_url=storage_url,
        host=raw.get("host", "127.0.0.1"),
        port=port,
        public=_public(raw.get("public", False)),
        root_path=root_path,
        studies=tuple(raw.get("study", ())),
        interval=interval,
        grace=grace,
        prune_pattern=raw.get("prune_pattern", DEFAULT_PRUNE_PATTERN),
        fail_pattern=raw.get("fail_pattern", DEFAULT_FAIL_PATTERN),
        dry_run=bool(raw.get("dry_run", False)),
        retroactive=not raw.get("active_only", False),
        verbose=bool(raw.get("verbose", False)),
        browser_path=raw.get("browser_path"),
        thorium_app=bool(raw.get("thorium_app", False)),
        artifact_dir=raw.get("artifact_dir"),
        db_password=password,
        notify_url=_notify_url(raw.get("notify_url")),
        apply_existing_notes=_public(raw.get("apply_existing_notes", False),
                                     "apply_existing_notes"),
    )
    settings = dataclasses.replace(settings, **_who_may_act(raw))
    return dataclasses.replace(settings, cert_path=_cert_path(raw, settings))


def _who_may_act(raw: dict[str, Any]) -> dict[str, Any]:
    from . import auth

    users: tuple[tuple[str, str], ...] = ()
    if raw.get("basic_auth_file") and raw.get("basic_auth"):
        raise ConfigError("give --basic-auth-file or HITL_BASIC_AUTH, not both")
    try:
        if raw.get("basic_auth_file"):
            path = raw["basic_auth_file"]
            try:
                with open(path, encoding="utf-8") as f:
                    lines = f.read().splitlines()
            except OSError as exc:
                raise ConfigError(
                    f"cannot read --basic-auth-file {path}: {exc.strerror}"
                ) from None
            users = auth.parse_credentials(lines, f"--basic-auth-file {path}")
        elif raw.get("basic_auth"):
            users = auth.parse_credentials(raw["basic_auth"].split(","), "HITL_BASIC_AUTH")
    except ValueError as exc:
        raise ConfigError(
            f"{exc}; make each line with `python -m hitl_pruner hash-password USER`"
        ) from None
    if (raw.get("basic_auth_file") or raw.get("basic_auth")) and not users:
        raise ConfigError("the basic auth credentials name no user; add user:hash lines")
    header = raw.get("user_header") or None
    if header is not None and not auth.HEADER_NAME.match(header):
        raise ConfigError(
            f"--user-header {header!r} is not a header name; give e.g. X-Remote-User"
        )
    if header is not None and users:
        raise ConfigError(
            "--user-header and basic auth exclude each other: a proxy names the user, or "
            "this server asks for a password; give one"
        )
    ips = raw.get("forwarded_allow_ips", "127.0.0.1")
    try:
        trusted = auth.parse_networks(ips if isinstance(ips, str) else ",".join(ips))
    except ValueError as exc:
        raise ConfigError(
            f"--forwarded-allow-ips: {exc}; give addresses or networks, comma-separated, or *"
        ) from None
    allowed_raw = raw.get("allowed_users")
    allowed = _studies(allowed_raw) if isinstance(allowed_raw, str) else tuple(allowed_raw or ())
    return {
        "basic_auth": users,
        "user_header": header,
        "forwarded_allow_ips": trusted,
        "allowed_users": allowed or None,
        **_browsers(raw),
    }


def _browsers(raw: dict[str, Any]) -> dict[str, Any]:
    from . import origin

    checked: dict[str, Any] = {}
    for key, check, example in (
        ("allowed_hosts", origin.normalize_host, "optuna.example.org"),
        ("trusted_origins", origin.normalize_origin, "https://tools.example.org"),
    ):
        value = raw.get(key) or ()
        items = _studies(value) if isinstance(value, str) else tuple(value)
        try:
            checked[key] = tuple(check(item) for item in items)
        except ValueError as exc:
            flag = "--" + key.replace("_", "-")
            raise ConfigError(f"{flag}: {exc}; give e.g. {example}, comma-separated") from None
    return checked


def _notify_url(value: Any) -> str | None:
    from . import notify

    if value is None or value == "":
        return None
    try:
        return notify.check_url(str(value))
    except ValueError as exc:
        raise ConfigError(f"--notify-url: {exc}") from None


def _public(value: Any, name: str = "public") -> bool:
    # A TOML string ("false") must not turn it on.
    if isinstance(value, str):
        try:
            return _bool(value)
        except ValueError as exc:
            raise ConfigError(f"{name}={value!r} is not valid: {exc}") from None
    return value is True


def _read_password(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"cannot read --db-password-file {path}: {exc.strerror}") from None


def _storage_url(raw: dict[str, Any]) -> str:
    url = raw.get("storage_url")
    db_url = raw.get("db_url")
    if url and db_url and url != db_url:
        raise ConfigError(
            "two storage URLs were given (STORAGE_URL and --db-url); give only one"
        )
    url = url or db_url
    if url:
        if "://" not in url:
            return url  # a journal file
        try:
            parsed = sa.make_url(url)
        except sa.exc.ArgumentError:
            raise ConfigError(
                f"{url!r} is not a storage URL; expected e.g. sqlite:///optuna.db or "
                "postgresql://user@host/db"
            ) from None
        # Plain mysql:// asks SQLAlchemy for MySQLdb, and postgresql:// (SQLAlchemy 2.1) for
        # psycopg 3: use the drivers we ship.
        if parsed.drivername in ("mysql", "postgresql"):
            parsed = parsed.set(drivername=DRIVERS[parsed.drivername])
        return parsed.render_as_string(hide_password=False)

    db_type = raw.get("db_type", "sqlite")
    if db_type not in DB_TYPES:
        raise ConfigError(f"--db-type must be one of {', '.join(DB_TYPES)}, not {db_type!r}")
    name = raw.get("db_name", "optuna")
    if db_type == "sqlite":
        return f"sqlite:///{name if name.endswith('.db') else name + '.db'}"
    return sa.URL.create(
        DRIVERS[db_type],
        username=raw.get("db_user", "optuna"),
        host=raw.get("db_host", "localhost"),
        port=int(raw.get("db_port", DEFAULT_PORTS[db_type])),
        database=name,
    ).render_as_string(hide_password=False)


def _cert_path(raw: dict[str, Any], settings: Settings) -> str | None:
    mode = raw.get("cert", "auto")
    if raw.get("use_cert"):
        mode = "use"  # the seed tool: --use-cert overrides --no-cert
    elif raw.get("no_cert"):
        mode = "off"
    if mode not in ("auto", "use", "off"):
        raise ConfigError(f"HITL_CERT must be auto, use or off, not {mode!r}")
    if mode == "off":
        return None
    url = settings.url
    networked = url is not None and url.get_backend_name() in ("postgresql", "mysql")
    path = raw.get("cert_path")
    if mode == "use":
        if not path:
            raise ConfigError("--use-cert needs --cert-path pointing at the CA certificate file")
        if not networked:
            raise ConfigError("--use-cert applies to PostgreSQL and MySQL storages only")
    if path is None:
        if networked and DEFAULT_CERT.is_file():
            logger.info("using the CA certificate at %s (--no-cert turns this off)", DEFAULT_CERT)
            return str(DEFAULT_CERT.resolve())
        return None
    if not Path(path).is_file():
        raise ConfigError(
            f"--cert-path {path} is not a file; give the CA certificate's path, or --no-cert"
        )
    return str(Path(path).resolve()) if networked else None
