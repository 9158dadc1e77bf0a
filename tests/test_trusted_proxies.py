"""One list of trusted proxies, whichever way the server is started.

gunicorn believes ``X-Forwarded-Proto: https`` and a ``SCRIPT_NAME`` header only from its
``forwarded_allow_ips``; hitl-pruner believes its ``X-Forwarded-*`` headers only from the
``forwarded_allow_ips`` setting. Each entry point must hand gunicorn that same setting, however
it was given (environment, TOML file, flag), and read the same way. Each test starts a real
server that trusts 127.0.0.3/31 (127.0.0.2 and .3, written with its host bits set, as the
setting allows and gunicorn's own parser does not), then sends the same spoofed headers from
127.0.0.1 (ignored) and from 127.0.0.2 (honoured): one server proves both halves.
"""

from __future__ import annotations

import http.client
from pathlib import Path
from typing import Callable
from typing import ContextManager

from processes import HOST
from processes import REPO_ROOT
from processes import Server
from processes import gunicorn_server
from processes import run_to_exit
from processes import serve_server
import pytest

pytestmark = pytest.mark.e2e

TRUSTED = "127.0.0.3/31"
PROXY = "127.0.0.2"  # in TRUSTED; the test's ordinary address, 127.0.0.1, is not
SCRIPTS_CONF = ["-c", "scripts/gunicorn.conf.py"]

Start = Callable[[str, Path], ContextManager[Server]]


def toml(tmp_path: Path) -> str:
    path = tmp_path / "hitl.toml"
    path.write_text(f'[hitl_pruner]\nforwarded_allow_ips = ["{TRUSTED}"]\n')
    return str(path)


ENTRY_POINTS: dict[str, Start] = {
    # `gunicorn wsgi:app` in the repository root reads ./gunicorn.conf.py.
    "gunicorn-env": lambda url, tmp: gunicorn_server(
        url, tmp, env={"HITL_FORWARDED_ALLOW_IPS": TRUSTED}
    ),
    "gunicorn-toml": lambda url, tmp: gunicorn_server(
        url, tmp, env={"HITL_CONFIG": toml(tmp)}
    ),
    "scripts-conf-env": lambda url, tmp: gunicorn_server(
        url, tmp, args=SCRIPTS_CONF, env={"HITL_FORWARDED_ALLOW_IPS": TRUSTED}
    ),
    "scripts-conf-toml": lambda url, tmp: gunicorn_server(
        url, tmp, args=SCRIPTS_CONF, env={"HITL_CONFIG": toml(tmp)}
    ),
    "serve-env": lambda url, tmp: serve_server(
        url, tmp, env={"HITL_FORWARDED_ALLOW_IPS": TRUSTED}
    ),
    "serve-flag": lambda url, tmp: serve_server(
        url, tmp, args=["--forwarded-allow-ips", TRUSTED]
    ),
    "serve-toml": lambda url, tmp: serve_server(
        url, tmp, args=["--from-config", toml(tmp)]
    ),
}


def get(server: Server, path: str, headers: dict[str, str], source: str) -> tuple[int, str, str]:
    """GET from ``source`` (a loopback address): status, Location and body."""
    conn = http.client.HTTPConnection(HOST, server.port, timeout=30, source_address=(source, 0))
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, response.getheader("Location", ""), response.read().decode()
    finally:
        conn.close()


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_forwarded_headers_count_from_the_configured_proxies_only(
    entry: str, sqlite_url: str, tmp_path: Path
) -> None:
    """Regression: plain `gunicorn wsgi:app` believed SCRIPT_NAME and X-Forwarded-Proto from
    127.0.0.1 whatever HITL_FORWARDED_ALLOW_IPS said (gunicorn.conf.py did not pass it on), no
    gunicorn config read HITL_CONFIG's forwarded_allow_ips, and a network the setting accepts
    stopped serve and scripts/gunicorn.conf.py at start."""
    with ENTRY_POINTS[entry](sqlite_url, tmp_path) as server:
        site = f"{HOST}:{server.port}"

        # From 127.0.0.1, not trusted: the headers change nothing.
        status, _, body = get(server, "/dashboard", {"SCRIPT_NAME": "/evil"}, HOST)
        assert status == 200 and 'src="/static/bundle.js"' in body, (status, body[:300])
        status, _, body = get(server, "/evil/dashboard", {"SCRIPT_NAME": "/evil"}, HOST)
        assert 'src="/evil/' not in body, (status, body[:300])
        status, location, _ = get(server, "/", {"X-Forwarded-Proto": "https"}, HOST)
        assert (status, location) == (302, f"http://{site}/dashboard")

        # From the trusted proxy: both count.
        status, _, body = get(server, "/evil/dashboard", {"SCRIPT_NAME": "/evil"}, PROXY)
        assert status == 200 and 'src="/evil/static/bundle.js"' in body, (status, body[:300])
        status, location, _ = get(server, "/", {"X-Forwarded-Proto": "https"}, PROXY)
        assert (status, location) == (302, f"https://{site}/dashboard")


def test_gunicorn_stops_when_its_command_line_trusts_other_proxies(tmp_path: Path) -> None:
    """gunicorn's own --forwarded-allow-ips overrides gunicorn.conf.py and reaches gunicorn
    only: the server stops with one line saying so instead of trusting two lists."""
    import sys

    from processes import free_port

    env = {
        "HITL_STORAGE_URL": f"sqlite:///{tmp_path / 'x.db'}",
        "HITL_HOST": HOST,
        "HITL_PORT": str(free_port()),
    }
    result = run_to_exit(
        [sys.executable, "-m", "gunicorn", "--forwarded-allow-ips", "*", "wsgi:app"],
        cwd=REPO_ROOT, env=env, timeout=30,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "gunicorn trusts forwarded headers from *, hitl-pruner from 127.0.0.1" in output
    assert "Traceback" not in output
