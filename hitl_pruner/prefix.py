"""Behind a reverse proxy: the path prefix, and forwarded headers only from trusted proxies.

``ProxyMiddleware(app, trusted=("127.0.0.1",), root_path="")`` is the outermost layer. Before
any other layer reads the environ it sets:

``SCRIPT_NAME``
    ``root_path`` when one is configured (``--root-path /optuna``). Otherwise the value the
    server set: gunicorn takes it from a ``SCRIPT_NAME`` request header, but only from the
    addresses in its ``--forwarded-allow-ips``. Otherwise ``X-Forwarded-Prefix`` when the
    request comes from a ``trusted`` address (the same list). When ``PATH_INFO`` still
    starts with the prefix (a proxy that passed the whole path), the prefix is cut off it, so
    the routes inside always see ``/dashboard``, ``/api/...``, ``/hitl/...``.
``X-Forwarded-For``, ``-Proto``, ``-Host``, ``-Prefix``
    Removed from the environ when the request does not come from a ``trusted`` address. The
    dashboard's framework (bottle) builds absolute URLs, e.g. its redirect from ``/``, from
    X-Forwarded-Host and -Proto whoever sent them.

The scheme (``wsgi.url_scheme`` from X-Forwarded-Proto) is gunicorn's job:
``secure_scheme_headers``, from the same ``forwarded_allow_ips``. A prefix that is not a
plain path (``/a/b``: letters, digits, ``-._~``) is ignored. The original values are kept
under ``environ["hitl_pruner.proxy.orig"]`` (``SCRIPT_NAME`` and ``PATH_INFO``, ``""`` when the
server set none, and the forwarded headers it had).
"""

from __future__ import annotations

import ipaddress
import logging
import re
from typing import TYPE_CHECKING
from typing import Any
from typing import Iterable
from typing import Union

from .dashboard import BUNDLE_API_BASE
from .dashboard import BUNDLE_ROUTER

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse
    from _typeshed.wsgi import WSGIApplication
    from _typeshed.wsgi import WSGIEnvironment

    from .config import Settings

logger = logging.getLogger(__name__)

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
FORWARDED = (
    "HTTP_X_FORWARDED_FOR",
    "HTTP_X_FORWARDED_PROTO",
    "HTTP_X_FORWARDED_HOST",
    "HTTP_X_FORWARDED_PREFIX",
)
FORWARDED_KEYS = frozenset(FORWARDED)
ORIG_KEY = "hitl_pruner.proxy.orig"
# Verdicts on client addresses, kept per middleware: parsing an address with ipaddress costs
# more than the rest of our request path together, and a server sees few distinct peers.
VERDICTS_KEPT = 4096
PREFIX = re.compile(r"^(/[A-Za-z0-9._~-]+)+$")


def clean_prefix(value: str) -> str | None:
    """``/optuna`` from ``/optuna/`` or ``/optuna``; ``""`` for ``/`` or nothing; None if bad."""
    value = value.strip().rstrip("/")
    if not value:
        return ""
    return value if PREFIX.match(value) and "/../" not in value + "/" else None


class ProxyMiddleware:
    """Set SCRIPT_NAME from the configured or trusted prefix; drop untrusted X-Forwarded-*."""

    def __init__(
        self,
        application: WSGIApplication,
        *,
        trusted: Iterable[str] = ("127.0.0.1",),
        root_path: str = "",
    ) -> None:
        self.application = application
        # As given; gunicorn_hooks checks that gunicorn trusts the same proxies.
        self.trusted = trusted = tuple(trusted)
        self._trust_all = "*" in trusted
        self._trusted: tuple[Network, ...] = tuple(
            ipaddress.ip_network(t, strict=False) for t in trusted if t != "*"
        )
        self._verdicts: dict[str, bool] = {}
        root = clean_prefix(root_path)
        if root is None:
            raise ValueError(f"root_path {root_path!r} is not a path like /optuna")
        self.root_path = root

    def __getattr__(self, name: str) -> Any:
        if name == "application":  # not set yet: no wrapped app to ask
            raise AttributeError(name)
        return getattr(self.application, name)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        # Every request passes here: the common one (no X-Forwarded-*, no prefix) costs a few
        # dictionary reads. The intersection walks the four names, not the environ.
        script_name = environ.get("SCRIPT_NAME", "")
        path = environ.get("PATH_INFO", "")
        orig = environ[ORIG_KEY] = {"SCRIPT_NAME": script_name, "PATH_INFO": path}
        prefix = self.root_path or (script_name.rstrip("/") if script_name else "")
        forwarded = environ.keys() & FORWARDED_KEYS
        if forwarded:
            for key in forwarded:
                orig[key] = environ[key]
            if not self._is_trusted(environ.get("REMOTE_ADDR", "")):
                for key in forwarded:
                    del environ[key]
            elif not prefix and "HTTP_X_FORWARDED_PREFIX" in forwarded:
                # A list when proxies chain; the first is the outermost, what the browser sees.
                raw = environ["HTTP_X_FORWARDED_PREFIX"].split(",")[0]
                cleaned = clean_prefix(raw)
                if cleaned is None:
                    logger.warning("ignored X-Forwarded-Prefix %r: not a path like /optuna", raw)
                prefix = cleaned or ""
        if prefix and (path == prefix or path.startswith(prefix + "/")):
            path = path[len(prefix):]
        environ["SCRIPT_NAME"] = prefix
        environ["PATH_INFO"] = path or "/"
        return self.application(environ, start_response)

    def _is_trusted(self, address: str) -> bool:
        verdict = self._verdicts.get(address)
        if verdict is None:
            if len(self._verdicts) >= VERDICTS_KEPT:
                self._verdicts.clear()  # many peers (a scan, or no proxy): start over
            verdict = self._verdicts[address] = self._judge(address)
        return verdict

    def _judge(self, address: str) -> bool:
        if self._trust_all:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:  # a Unix socket: no address, and only local processes reach it
            return address == ""
        return any(ip in network for network in self._trusted)


# optuna-dashboard compiles its router's prefix and its API client's base URL into bundle.js
# (webpack's DefinePlugin: URL_PREFIX="/dashboard", API_ENDPOINT unset): nothing the page can
# set moves them. Under a prefix, these two literals are rewritten in the served copy; the
# installed release's spelling of each is in dashboard.py.
BUNDLE_PATH = "/static/bundle.js"


def prefixed_bundle(bundle: bytes, prefix: str) -> bytes | None:
    """The dashboard's bundle with its routes and API calls under ``prefix``; None if the
    bundle does not have exactly one of each literal (another optuna-dashboard version)."""
    encoded = prefix.encode()
    if bundle.count(BUNDLE_ROUTER) != 1 or len(BUNDLE_API_BASE.findall(bundle)) != 1:
        return None
    bundle = bundle.replace(BUNDLE_ROUTER, b'url_prefix:"' + encoded + b'/dashboard"')
    return BUNDLE_API_BASE.sub(lambda m: m[1] + b'"' + encoded + b'"' + m[3], bundle)


def prefixed_page(page: bytes, prefix: str) -> bytes:
    """The dashboard's index.html loading its bundle from under ``prefix``."""
    return page.replace(
        b'src="/static/bundle.js"', b'src="' + prefix.encode() + b'/static/bundle.js"'
    )


def behind_proxy(application: WSGIApplication, settings: Settings) -> ProxyMiddleware:
    """``application`` wrapped for the proxy ``settings`` describe (the servers' last step)."""
    return ProxyMiddleware(
        application, trusted=settings.forwarded_allow_ips, root_path=settings.root_path
    )
