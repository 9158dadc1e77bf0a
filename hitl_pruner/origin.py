"""Requests from other sites: refused when they could change state; never framed.

``CrossOriginGuard(app, trusted_origins=())`` wraps the whole application (the dashboard and
hitl-pruner's routes), inside :class:`~hitl_pruner.prefix.ProxyMiddleware`. It follows Go 1.25's
``net/http.CrossOriginProtection``: no tokens, no cookies, only what the browser says.

A request whose method is GET, HEAD or OPTIONS always passes (none of them changes state).
Any other method:

``Origin`` on ``trusted_origins``
    Passes (``https://tools.example.org``: scheme, host and port, nothing else).
``Sec-Fetch-Site: same-origin`` or ``none``
    Passes: the browser says one of this server's own pages sent it, or the user did.
``Sec-Fetch-Site`` with any other value (``same-site``, ``cross-site``)
    ``403``: another origin's page sent it. A different port is another origin.
no ``Sec-Fetch-Site``, an ``Origin``
    Browsers send no ``Sec-Fetch-Site`` to plain-http addresses other than localhost. The
    Origin's ``host:port`` must be the host the request was sent to: ``X-Forwarded-Host`` (its
    first value) when present, else ``Host``. ProxyMiddleware has already removed
    ``X-Forwarded-Host`` unless a trusted proxy sent it. Otherwise ``403``.
neither header
    Passes: not a browser's request (curl, scripts, workers), so no other site sent it.

Before any of that, the host the request was sent to (the same X-Forwarded-Host or Host) must
be one this server answers to: an IP address, ``localhost`` (or a name under ``.localhost``,
which browsers resolve themselves), or a name on ``allowed_hosts`` (``*``: any). Otherwise
``403``. A page from a name its owner points at this server's address (DNS rebinding) is
same-origin to the browser, so only the name tells it apart; a request without Host is not a
browser's and passes.

A request that passed and carries a body (``Content-Length`` above 0, or chunked) must say
``Content-Type: application/json``, else ``415``: every state-changing route of the dashboard
and of hitl-pruner reads JSON, and a JSON content type is one that no page of another site can
send without the server's leave (a CORS preflight, which this server never grants).

Refusals are JSON ``{"reason": ...}`` saying what was refused and how to fix it.

Every response, the refusals included, gets ``X-Frame-Options: SAMEORIGIN`` and
``frame-ancestors 'self'`` in its Content-Security-Policy (appended to the policy the response
already has, unless that policy names its own ``frame-ancestors``): no other site can frame a
page with one-click buttons. Every response, not only text/html: the dashboard serves artifacts
under the MIME type they were uploaded with (HTML, SVG, PDF are documents too).

Attributes this class does not have are the wrapped application's, as for the other layers.
"""

from __future__ import annotations

import ipaddress
import json
import operator
import re
from typing import TYPE_CHECKING
from typing import Any
from typing import Iterable
from urllib.parse import urlsplit

from .routes import SAFE_METHODS

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse
    from _typeshed.wsgi import WSGIApplication
    from _typeshed.wsgi import WSGIEnvironment

SAME_ORIGIN_SITES = frozenset({"same-origin", "none"})
JSON_TYPE = "application/json"
FRAME_OPTIONS = ("X-Frame-Options", "SAMEORIGIN")
FRAME_ANCESTORS = "frame-ancestors 'self'"
FRAME_POLICY = ("Content-Security-Policy", FRAME_ANCESTORS)
FRAMING_HEADERS = frozenset({"x-frame-options", "content-security-policy"})
_NAME = operator.itemgetter(0)
DEFAULT_PORTS = {"http": "80", "https": "443"}
HOST_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$")
PROXY_HINT = (
    "behind a reverse proxy, forward the Host header with its port (nginx: proxy_set_header "
    "Host $http_host) or set X-Forwarded-Host, from an address in --forwarded-allow-ips"
)


def normalize_origin(origin: str) -> str:
    """``scheme://host[:port]`` in lower case, without the scheme's default port.

    Raises ValueError for anything else (a path, a query, user info, a bad port).
    """
    parts = urlsplit(origin.strip())
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"not an origin (bad port): {origin!r}") from None
    if (
        parts.scheme.lower() not in DEFAULT_PORTS
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username is not None
    ):
        raise ValueError(f"not an origin like https://host.example:8443: {origin!r}")
    scheme = parts.scheme.lower()
    host = parts.netloc.lower()
    if port is not None and str(port) == DEFAULT_PORTS[scheme]:
        host = host.rsplit(":", 1)[0]
    return f"{scheme}://{host}"


class CrossOriginGuard:
    """Refuse state-changing requests from other origins, and framing by other sites."""

    def __init__(
        self,
        application: WSGIApplication,
        *,
        trusted_origins: Iterable[str] = (),
        allowed_hosts: Iterable[str] = (),
    ) -> None:
        self.application = application
        self.trusted_origins = frozenset(normalize_origin(o) for o in trusted_origins)
        self.allowed_hosts = frozenset(normalize_host(h) for h in allowed_hosts)

    def __getattr__(self, name: str) -> Any:
        if name == "application":  # not set yet: no wrapped app to ask
            raise AttributeError(name)
        return getattr(self.application, name)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        def framed(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            return start_response(status, _with_frame_headers(headers), exc_info)

        method = environ.get("REQUEST_METHOD", "GET")
        if method not in SAFE_METHODS:
            refused = self.refusal(environ)
            if refused is not None:
                return _json(framed, "403 Forbidden", refused)
            if _has_body(environ) and not _is_json(environ.get("CONTENT_TYPE", "")):
                given = environ.get("CONTENT_TYPE") or "none"
                reason = (
                    f"refused {method} with Content-Type {given}: send the body as JSON, with "
                    f"Content-Type: {JSON_TYPE}"
                )
                return _json(framed, "415 Unsupported Media Type", reason)
        return self.application(environ, framed)

    def refusal(self, environ: WSGIEnvironment) -> str | None:
        """Why this state-changing request looks sent by another origin's page, or None."""
        method = environ.get("REQUEST_METHOD", "")
        host = _requested_host(environ)
        if host is not None and not self._serves(host):
            return (
                f"refused a {method} sent to {host!r}: this server answers state-changing "
                "requests only under an IP address, localhost, or a name on --allowed-hosts "
                "(HITL_ALLOWED_HOSTS), so that a page whose own name points at this server "
                "(DNS rebinding) cannot act here; add the name you serve under"
            )
        origin = environ.get("HTTP_ORIGIN")
        if origin is not None and self._trusted(origin):
            return None
        site = environ.get("HTTP_SEC_FETCH_SITE")
        if site is not None:
            if site.strip().lower() in SAME_ORIGIN_SITES:
                return None
            return (
                f"refused a cross-origin {method}: the browser says a page of another origin sent "
                f"it (Sec-Fetch-Site: {site}); only this server's own pages may change state"
            )
        if origin is None:
            return None  # neither header: not a browser's request
        host = _requested_host(environ)
        if host is not None and _same_host(origin, host):
            return None
        return (
            f"refused a cross-origin {method}: its Origin {origin} is not the host it was sent "
            f"to ({host or 'no Host header'}); {PROXY_HINT}"
        )

    def _serves(self, host: str) -> bool:
        name = _hostname(host)
        if "*" in self.allowed_hosts or name in self.allowed_hosts:
            return True
        if name == "localhost" or name.endswith(".localhost"):
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True

    def _trusted(self, origin: str) -> bool:
        try:
            return normalize_origin(origin) in self.trusted_origins
        except ValueError:
            return False


def normalize_host(host: str) -> str:
    """A host name for ``allowed_hosts``, in lower case; ``*`` for any. ValueError if not one."""
    name = host.strip().lower().rstrip(".")
    if name == "*" or HOST_NAME.match(name):
        return name
    raise ValueError(f"not a host name like optuna.example.org: {host!r}")


def _hostname(host: str) -> str:
    """The name in a Host header, without its port or an IPv6 address's brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def _requested_host(environ: WSGIEnvironment) -> str | None:
    # ProxyMiddleware, outside, has dropped X-Forwarded-Host unless a trusted proxy sent it.
    forwarded = environ.get("HTTP_X_FORWARDED_HOST", "").split(",")[0].strip()
    return forwarded or environ.get("HTTP_HOST", "").strip() or None


def _same_host(origin: str, host: str) -> bool:
    try:
        normalized = normalize_origin(origin)
    except ValueError:
        return False  # e.g. "null", from a sandboxed frame or a file: page
    scheme, _, origin_host = normalized.partition("://")
    host = host.lower()
    # A proxy may name the default port that the browser's Origin leaves out.
    if host.endswith(":" + DEFAULT_PORTS[scheme]):
        host = host.rsplit(":", 1)[0]
    return origin_host == host


def _has_body(environ: WSGIEnvironment) -> bool:
    if environ.get("HTTP_TRANSFER_ENCODING"):
        return True
    length = (environ.get("CONTENT_LENGTH") or "").strip()
    if not length:
        return False
    try:
        return int(length) != 0
    except ValueError:
        return True  # a server would have refused it; nothing unread passes unchecked


def _is_json(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == JSON_TYPE


def _with_frame_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    # Every response passes here; most (the API's, the bundle) set neither header, and this
    # test of theirs runs in C.
    if FRAMING_HEADERS.isdisjoint(map(str.lower, map(_NAME, headers))):
        return [*headers, FRAME_OPTIONS, FRAME_POLICY]
    framed = policy = None
    for i, (name, _) in enumerate(headers):
        lower = name.lower()
        if lower == "x-frame-options":
            framed = i
        elif lower == "content-security-policy" and policy is None:
            policy = i
    headers = list(headers)
    if framed is None:
        headers.append(FRAME_OPTIONS)
    if policy is None:
        headers.append(FRAME_POLICY)
    elif not any(_names_frame_ancestors(value) for name, value in headers
                 if name.lower() == "content-security-policy"):
        # One policy, made stricter; a second header would be enforced too, but reads as a
        # conflict to whoever debugs the page.
        name, value = headers[policy]
        value = value.strip().rstrip(";").strip()
        headers[policy] = (name, f"{value}; {FRAME_ANCESTORS}" if value else FRAME_ANCESTORS)
    return headers


def _names_frame_ancestors(policy: str) -> bool:
    return any(
        directive.strip().lower().split(" ", 1)[0] == "frame-ancestors"
        for directive in policy.split(";")
    )


def _json(start_response: StartResponse, status: str, reason: str) -> list[bytes]:
    data = json.dumps({"reason": reason}).encode()
    start_response(
        status,
        [
            ("Content-Type", JSON_TYPE),
            ("Content-Length", str(len(data))),
            ("Cache-Control", "no-store"),
        ],
    )
    return [data]
