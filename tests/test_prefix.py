"""ProxyMiddleware in process: which forwarded headers count, and the dashboard under a prefix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from helpers import app_for
from helpers import call
import optuna_dashboard
import pytest

from hitl_pruner.config import ConfigError
from hitl_pruner.config import resolve
from hitl_pruner.dashboard import BUNDLE_API_BASE
from hitl_pruner.prefix import ORIG_KEY
from hitl_pruner.prefix import ProxyMiddleware
from hitl_pruner.prefix import clean_prefix
from hitl_pruner.prefix import prefixed_bundle

BUNDLE = Path(optuna_dashboard.__file__).parent / "public" / "bundle.js"


def seen(environ: dict[str, Any], **options: Any) -> dict[str, Any]:
    """The environ the wrapped app gets."""
    got: dict[str, Any] = {}

    def app(env: dict[str, Any], start_response: Any) -> list[bytes]:
        got.update(env)
        start_response("200 OK", [])
        return []

    ProxyMiddleware(app, **options)(dict(environ), lambda *a: None)
    return got


TRUSTED = {"REMOTE_ADDR": "127.0.0.1"}
UNTRUSTED = {"REMOTE_ADDR": "192.0.2.7"}
SPOOF = {
    "HTTP_X_FORWARDED_PREFIX": "/optuna",
    "HTTP_X_FORWARDED_HOST": "proxy.example",
    "HTTP_X_FORWARDED_PROTO": "https",
    "HTTP_X_FORWARDED_FOR": "198.51.100.1",
}


@pytest.mark.parametrize(
    ("environ", "options", "script_name", "path_info", "kept"),
    [
        pytest.param({**TRUSTED, "PATH_INFO": "/dashboard"}, {}, "", "/dashboard", True,
                     id="no-prefix"),
        pytest.param({**TRUSTED, **SPOOF, "PATH_INFO": "/dashboard"}, {}, "/optuna",
                     "/dashboard", True, id="trusted-prefix"),
        pytest.param({**TRUSTED, **SPOOF, "PATH_INFO": "/optuna/api/studies"}, {}, "/optuna",
                     "/api/studies", True, id="trusted-prefix-whole-path"),
        pytest.param({**UNTRUSTED, **SPOOF, "PATH_INFO": "/dashboard"}, {}, "", "/dashboard",
                     False, id="untrusted-ignored"),
        pytest.param({**UNTRUSTED, **SPOOF, "PATH_INFO": "/dashboard"},
                     {"trusted": ["192.0.2.0/24"]}, "/optuna", "/dashboard", True,
                     id="trusted-network"),
        pytest.param({**UNTRUSTED, **SPOOF, "PATH_INFO": "/dashboard"}, {"trusted": ["*"]},
                     "/optuna", "/dashboard", True, id="trust-all"),
        pytest.param({**TRUSTED, "HTTP_X_FORWARDED_PREFIX": "/a/../b", "PATH_INFO": "/x"}, {},
                     "", "/x", True, id="bad-prefix-ignored"),
        pytest.param({**TRUSTED, "HTTP_X_FORWARDED_PREFIX": "/outer, /inner",
                      "PATH_INFO": "/x"}, {}, "/outer", "/x", True, id="chain-outermost"),
        pytest.param({**TRUSTED, **SPOOF, "SCRIPT_NAME": "/gunicorn", "PATH_INFO": "/x"}, {},
                     "/gunicorn", "/x", True, id="server-script-name-wins"),
        pytest.param({**UNTRUSTED, **SPOOF, "PATH_INFO": "/optuna/dashboard"},
                     {"root_path": "/optuna/"}, "/optuna", "/dashboard", False,
                     id="root-path"),
        pytest.param({**TRUSTED, "PATH_INFO": "/optuna"}, {"root_path": "/optuna"}, "/optuna",
                     "/", True, id="root-path-bare"),
    ],
)
def test_forwarded_headers(
    environ: dict[str, Any], options: dict[str, Any], script_name: str, path_info: str,
    kept: bool,
) -> None:
    got = seen(environ, **options)
    assert (got["SCRIPT_NAME"], got["PATH_INFO"]) == (script_name, path_info)
    forwarded = {k: v for k, v in got.items() if k.startswith("HTTP_X_FORWARDED_")}
    expected = {k: v for k, v in environ.items() if k.startswith("HTTP_X_FORWARDED_")}
    assert forwarded == (expected if kept else {})
    assert got[ORIG_KEY]["PATH_INFO"] == environ["PATH_INFO"]


@pytest.mark.parametrize(
    ("raw", "clean"),
    [("", ""), ("/", ""), ("/optuna/", "/optuna"), ("/a/b-c_d.e~", "/a/b-c_d.e~"),
     ("optuna", None), ("/a b", None), ('/"x', None), ("/a/../b", None), ("/a//b", None)],
)
def test_clean_prefix(raw: str, clean: str | None) -> None:
    assert clean_prefix(raw) == clean


def test_root_path_setting() -> None:
    assert resolve({"root_path": "/optuna/"}, environ={}).root_path == "/optuna"
    assert resolve({}, environ={"HITL_ROOT_PATH": "/x"}).root_path == "/x"
    assert resolve({}, environ={}).root_path == ""
    with pytest.raises(ConfigError, match="--root-path must be a path like /optuna"):
        resolve({"root_path": "optuna"}, environ={})


def test_the_installed_bundle_can_be_moved_under_a_prefix() -> None:
    """optuna-dashboard's bundle.js still has the two literals prefixed_bundle rewrites."""
    moved = prefixed_bundle(BUNDLE.read_bytes(), "/optuna")
    assert moved is not None
    assert b'url_prefix:"/optuna/dashboard"' in moved
    # The API client's base, spelled as the installed release spells it (dashboard.py).
    [(_, base, _)] = BUNDLE_API_BASE.findall(moved)
    assert base == b'"/optuna"'
    assert prefixed_bundle(b"console.log(1)", "/optuna") is None


def test_the_dashboard_under_a_root_path(sqlite_url: str) -> None:
    app = ProxyMiddleware(app_for(sqlite_url), root_path="/optuna")
    page = call(app, "GET", "/optuna/dashboard/studies/1")
    assert page.status == 200
    assert b'src="/optuna/static/bundle.js"' in page.body
    assert b'src="/optuna/hitl/static/hitl.js"' in page.body
    bundle = call(app, "GET", "/optuna/static/bundle.js")
    assert bundle.status == 200 and b'url_prefix:"/optuna/dashboard"' in bundle.body
    gzipped = call(app, "GET", "/optuna/static/bundle.js",
                   environ={"HTTP_ACCEPT_ENCODING": "gzip, br"})
    assert gzipped.headers["Content-Encoding"] == "gzip"
    again = call(app, "GET", "/optuna/static/bundle.js",
                 environ={"HTTP_IF_NONE_MATCH": bundle.headers["ETag"]})
    assert again.status == 304
    start = call(app, "GET", "/optuna/")
    assert (start.status, start.headers["Location"]) == (302, "/optuna/dashboard")
    assert call(app, "GET", "/optuna/api/studies").status == 200
    assert call(app, "GET", "/optuna/hitl/api/actions").status == 200
    # Without a prefix, the dashboard's own bundle and redirect.
    plain = ProxyMiddleware(app_for(sqlite_url))
    assert b'src="/static/bundle.js"' in call(plain, "GET", "/dashboard").body


def test_one_middleware_judges_each_peer_on_its_own() -> None:
    """The remembered verdict on a trusted proxy never lets another peer's X-Forwarded-* in."""
    seen: list[dict[str, object]] = []
    middleware = ProxyMiddleware(lambda environ, start: seen.append(environ) or [],
                                 trusted=("10.0.0.1",))
    forwarded = {"HTTP_X_FORWARDED_PREFIX": "/optuna", "PATH_INFO": "/optuna/api/meta"}
    for peer in ("10.0.0.1", "10.0.0.2", "10.0.0.1", "10.0.0.2"):
        middleware({"REMOTE_ADDR": peer, **forwarded}, lambda *a: None)
    assert [e["SCRIPT_NAME"] for e in seen] == ["/optuna", "", "/optuna", ""]
    assert ["HTTP_X_FORWARDED_PREFIX" in e for e in seen] == [True, False, True, False]
