"""Clients that send half a request and stall.

gunicorn's gthread worker reads a request in one of its few threads, and a client that sends
part of one holds that thread. Behind the nginx site we ship, nginx reads every request whole
before it passes it on, so stalled clients cost nginx a connection each and gunicorn nothing.
``serve`` has no nginx in front: it refuses to listen on an address that is not loopback
unless told to with ``--public``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
import socket
import sys
import time
from typing import Iterator

from optuna.storages import RDBStorage
from optuna.trial import TrialState
from processes import HOST
from processes import run_to_exit
import pytest
import requests
from test_proxy import deployed
from test_proxy import put_note
from test_proxy import seed

pytestmark = pytest.mark.e2e

STALLED = 200
# What each stalled client sends before it stops: half a request line, half the headers, the
# headers and half a body (with a length, and chunked). Each is a request nginx must wait for.
PARTIAL = (
    b"GET /hea",
    b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: ",
    b"PUT /api/studies/1/1/note HTTP/1.1\r\nHost: localhost\r\n"
    b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"version\": 1, ",
    b"POST /api/trials/1/tell HTTP/1.1\r\nHost: localhost\r\n"
    b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{\"state\":",
)
# The promise: answers within a second while the clients stall.
ANSWER_WITHIN = 1.0


@contextlib.contextmanager
def stalled_clients(port: int, count: int) -> Iterator[list[socket.socket]]:
    """``count`` loopback connections to ``port``, each holding part of a request; all closed
    on the way out."""
    sockets: list[socket.socket] = []
    try:
        for i in range(count):
            sock = socket.create_connection((HOST, port), timeout=5)
            sockets.append(sock)
            sock.sendall(PARTIAL[i % len(PARTIAL)])
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def still_waiting(sock: socket.socket) -> bool:
    """The peer keeps the connection open and has answered nothing yet."""
    sock.setblocking(False)
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(5)
    return False


def test_stalled_clients_behind_nginx_leave_saves_and_healthz_answering(
    sqlite_url: str, tmp_path: Path
) -> None:
    """Regression: clients that send half a request held gunicorn's threads until nothing
    answered. Behind the shipped nginx site, 200 of them leave note saves and /healthz
    answering within a second."""
    sid, ids, _ = seed(sqlite_url)
    with deployed(sqlite_url, tmp_path) as proxy:
        # Once before, so that the rounds below time answers, not a first request's set-up.
        assert proxy.get("/healthz").status == 200
        assert put_note(proxy, "", sid, ids[2], 1, "note 1").status == 204
        with stalled_clients(proxy.port, STALLED) as sockets:
            latencies: list[float] = []
            # Several rounds: the stalled requests reach whatever they can reach meanwhile.
            for version in range(2, 7):
                started = time.monotonic()
                health = requests.get(f"{proxy.base}/healthz", timeout=ANSWER_WITHIN)
                assert health.status_code == 200, health.text
                latencies.append(time.monotonic() - started)
                started = time.monotonic()
                body = "slow clients\nPRUNE" if version == 6 else f"note {version}"
                saved = requests.put(
                    f"{proxy.base}/api/studies/{sid}/{ids[2]}/note",
                    json={"version": version, "body": body}, timeout=ANSWER_WITHIN,
                )
                assert saved.status_code == 204, saved.text
                latencies.append(time.monotonic() - started)
                time.sleep(0.2)
            waiting = sum(still_waiting(sock) for sock in sockets)
        print(f"{STALLED} stalled clients: {waiting} still open at the end; "
              f"slowest answer {max(latencies) * 1000:.0f} ms")
        assert waiting == STALLED
        assert RDBStorage(sqlite_url).get_trial(ids[2]).state is TrialState.PRUNED


@pytest.mark.parametrize(
    "args, env",
    [
        (["--host", "0.0.0.0"], {}),
        (["--host", "::"], {}),
        ([], {"HITL_HOST": "0.0.0.0"}),
        (["--host", "0.0.0.0"], {"HITL_PUBLIC": "0"}),
    ],
    ids=["any-ipv4", "any-ipv6", "env", "public-off"],
)
def test_serve_refuses_a_public_address_without_public(
    args: list[str], env: dict[str, str], tmp_path: Path
) -> None:
    """Regression: four clients that send half a request froze `serve` (one worker, four
    threads), /healthz included. serve does not listen where anyone can reach it unless given
    --public: it exits 2 with one line that says why and what to do."""
    url = f"sqlite:///{tmp_path / 'x.db'}"
    result = run_to_exit(
        [sys.executable, "-m", "hitl_pruner", "serve", url, "--port", "1", *args],
        cwd=tmp_path, env=env, timeout=30,
    )
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("hitl-pruner: error: --host "), lines
    for words in ("not a loopback address", "slow clients", "nginx", "README", "--public"):
        assert words in lines[0], lines[0]
    assert result.stdout == ""
