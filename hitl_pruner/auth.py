"""Who is asking: the user name from a trusted proxy header, or from HTTP basic auth.

``AuthMiddleware`` wraps the whole application (the dashboard, its API and hitl-pruner's pages)
and leaves the user name in ``REMOTE_USER``, where the note-save path reads it for the audit
and the allow-list:

``users`` (HTTP basic auth, for servers without a proxy)
    Every request needs ``Authorization: Basic`` with a listed user and its password; anything
    else is answered ``401`` with ``WWW-Authenticate: Basic realm="hitl-pruner"``. The user
    name replaces any ``REMOTE_USER``. Passwords are kept as hashes made by
    :func:`hash_password` (``python -m hitl_pruner hash-password USER``): scrypt with a random
    salt, compared in constant time.
``user_header`` (a proxy that authenticates, e.g. ``X-Remote-User``)
    The header names the user only when the request comes from a ``trusted`` address (the
    proxy's); from any other address it is dropped, so a client cannot name itself. The proxy
    must set the header on every request, overwriting what the client sent. ``REMOTE_USER``
    set by the WSGI server itself is kept and wins over the header.

The header, trusted or not, is removed from the environ before the application sees it; its
value, when used, is kept under ``hitl_pruner.auth.user_header``.

:class:`Refusals` remembers the note versions the allow-list refused, so that the sweep never
applies them later (see :class:`~hitl_pruner.applier.Applier`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import threading
from typing import TYPE_CHECKING
from typing import Any
from typing import Iterable
from typing import Mapping
from typing import Union

from optuna.storages import BaseStorage
from optuna.storages import RDBStorage
import sqlalchemy as sa

from .health import HEALTH_PATH
from .store import Note
from .store import TrialRef

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse
    from _typeshed.wsgi import WSGIApplication
    from _typeshed.wsgi import WSGIEnvironment

logger = logging.getLogger(__name__)

REALM = "hitl-pruner"
SCHEME = "scrypt"
# scrypt's cost: 16 MiB and ~50 ms per hash. A verified header is cached, so a browser's many
# requests pay it once.
SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_LEN = 2**14, 8, 1, 32
CACHE_SIZE = 256
HEADER_NAME = re.compile(r"^[A-Za-z0-9-]+$")
USER_NAME = re.compile(r"^[^:,\s][^:,]*$")
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class HashError(ValueError):
    """A stored password hash is not one hash_password() makes."""


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """``scrypt$N$r$p$salt$hash`` (base64): what a credentials line holds after ``user:``."""
    salt = os.urandom(16) if salt is None else salt
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=SCRYPT_LEN
    )
    return "$".join(
        [SCHEME, str(SCRYPT_N), str(SCRYPT_R), str(SCRYPT_P), _b64(salt), _b64(digest)]
    )


def check_hash(stored: str) -> None:
    """Raise HashError unless ``stored`` is a hash this module can verify."""
    _parse_hash(stored)


def verify_password(password: str, stored: str) -> bool:
    scheme_n_r_p, salt, digest = _parse_hash(stored)
    n, r, p = scheme_n_r_p
    computed = hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, dklen=len(digest), maxmem=256 * 1024 * 1024
    )
    return hmac.compare_digest(computed, digest)


def parse_credentials(lines: Iterable[str], where: str) -> tuple[tuple[str, str], ...]:
    """``user:hash`` lines (blank lines and ``#`` comments skipped) -> ((user, hash), ...)."""
    users: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, stored = line.partition(":")
        user = user.strip()
        if not sep or not USER_NAME.match(user):
            raise ValueError(f"{where}, entry {number}: expected user:hash")
        try:
            check_hash(stored.strip())
        except HashError as exc:
            raise ValueError(f"{where}, entry {number} (user {user!r}): {exc}") from None
        users[user] = stored.strip()
    return tuple(users.items())


def parse_networks(text: str) -> tuple[str, ...]:
    """Comma-separated addresses or networks, or ``*`` (any); checked, returned as given."""
    items = tuple(item.strip() for item in text.split(",") if item.strip())
    for item in items:
        if item != "*":
            ipaddress.ip_network(item, strict=False)  # ValueError names the bad one
    return items


class AuthMiddleware:
    """Set ``REMOTE_USER`` from basic auth or a trusted proxy's header; see the module doc."""

    def __init__(
        self,
        application: WSGIApplication,
        *,
        users: Mapping[str, str] | None = None,
        user_header: str | None = None,
        trusted: Iterable[str] = ("127.0.0.1",),
        realm: str = REALM,
    ) -> None:
        self.application = application
        self._users = dict(users or {})
        for stored in self._users.values():
            check_hash(stored)
        if user_header is not None and not HEADER_NAME.match(user_header):
            raise ValueError(f"not an HTTP header name: {user_header!r}")
        self._header_key = (
            "HTTP_" + user_header.upper().replace("-", "_") if user_header else None
        )
        trusted = tuple(trusted)
        self._trust_all = "*" in trusted
        self._trusted: tuple[Network, ...] = tuple(
            ipaddress.ip_network(t, strict=False) for t in trusted if t != "*"
        )
        self._challenge = f'Basic realm="{realm}", charset="UTF-8"'
        # Unknown users still cost one hash, so that timing does not tell which users exist.
        self._dummy = hash_password("", salt=b"\0" * 16)
        # Authorization headers verified already, by HMAC under a per-process key.
        self._key = os.urandom(32)
        self._verified: dict[bytes, str] = {}
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        if name == "application":  # not set yet: no wrapped app to ask
            raise AttributeError(name)
        return getattr(self.application, name)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if self._header_key is not None:
            self._from_header(environ)
        if self._users and not _is_health_probe(environ):
            user = self._basic_user(environ.get("HTTP_AUTHORIZATION", ""))
            if user is None:
                return self._unauthorized(start_response)
            environ["REMOTE_USER"] = user
        return self.application(environ, start_response)

    def _from_header(self, environ: WSGIEnvironment) -> None:
        assert self._header_key is not None
        value = environ.pop(self._header_key, None)
        if value is None:
            return
        value = value.strip()
        if not self._is_trusted(environ.get("REMOTE_ADDR", "")):
            logger.debug(
                "dropped the user header from untrusted address %s", environ.get("REMOTE_ADDR")
            )
            return
        if value and not environ.get("REMOTE_USER"):
            environ["hitl_pruner.auth.user_header"] = value
            environ["REMOTE_USER"] = value

    def _is_trusted(self, address: str) -> bool:
        if self._trust_all:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False  # e.g. a Unix socket: no address to trust
        return any(ip in network for network in self._trusted)

    def _basic_user(self, header: str) -> str | None:
        scheme, _, encoded = header.strip().partition(" ")
        if scheme.lower() != "basic" or not encoded:
            return None
        tag = hmac.new(self._key, encoded.strip().encode(), hashlib.sha256).digest()
        with self._lock:
            cached = self._verified.get(tag)
        if cached is not None:
            return cached
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        user, sep, password = decoded.partition(":")
        if not sep:
            return None
        stored = self._users.get(user)
        ok = verify_password(password, stored if stored is not None else self._dummy)
        if not ok or stored is None:
            return None
        with self._lock:
            if len(self._verified) >= CACHE_SIZE:
                self._verified.clear()
            self._verified[tag] = user
        return user

    def _unauthorized(self, start_response: StartResponse) -> list[bytes]:
        data = json.dumps({"reason": "log in: this server needs a user name and password"})
        start_response(
            "401 Unauthorized",
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(data))),
                ("WWW-Authenticate", self._challenge),
            ],
        )
        return [data.encode()]


class Refusals:
    """Note versions whose commands the allow-list refused, kept in the study's system attrs.

    One attr per refusal, ``hitl:refused:<trial_id>:<version>:<sha256 of the body>``, holding
    the user; it is written before the note is saved, so no sweep can apply that
    note in between. The body's hash keeps a concurrent save of the same version by someone
    else from being taken for the refused one.
    """

    PREFIX = "hitl:refused:"

    def __init__(self, storage: BaseStorage) -> None:
        self._storage = storage

    def key(self, ref: TrialRef, note: Note) -> str:
        digest = hashlib.sha256(note.body.encode()).hexdigest()[:32]
        return f"{self.PREFIX}{ref.trial_id}:{note.version}:{digest}"

    def mark(self, ref: TrialRef, note: Note, user: str | None) -> None:
        self._storage.set_study_system_attr(ref.study_id, self.key(ref, note), user or "")

    def refused_by(self, ref: TrialRef, note: Note) -> str | None:
        """The user whose save of this very note was refused, or None."""
        key = self.key(ref, note)
        if isinstance(self._storage, RDBStorage):
            # One row, not the study's every note chunk.
            from .rdb import attrs_t

            with self._storage.engine.connect() as conn:
                value = conn.execute(
                    sa.select(attrs_t.c.value_json)
                    .where(attrs_t.c.study_id == ref.study_id)
                    .where(attrs_t.c.key == key)
                ).scalar()
            return None if value is None else str(json.loads(value))
        value = self._storage.get_study_system_attrs(ref.study_id).get(key)
        return None if value is None else str(value)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _parse_hash(stored: str) -> tuple[tuple[int, int, int], bytes, bytes]:
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != SCHEME:
        raise HashError(
            "not a password hash; make one with `python -m hitl_pruner hash-password USER`"
        )
    try:
        n, r, p = (int(x) for x in parts[1:4])
        salt, digest = _unb64(parts[4]), _unb64(parts[5])
    except (ValueError, binascii.Error):
        raise HashError(
            "a damaged password hash; make a new one with `python -m hitl_pruner hash-password`"
        ) from None
    if n < 2 or n & (n - 1) or r < 1 or p < 1 or len(digest) < 16:
        raise HashError("a password hash with impossible scrypt parameters")
    return (n, r, p), salt, digest


def _is_health_probe(environ: WSGIEnvironment) -> bool:
    # Orchestrators probe without credentials, and /healthz tells nothing worth a login.
    return environ.get("PATH_INFO") == HEALTH_PATH and environ.get("REQUEST_METHOD") in (
        "GET", "HEAD"
    )
