"""Real server processes for the end-to-end tests: start, wait until ready, talk HTTP, stop.

``gunicorn_server(...)`` runs ``python -m gunicorn wsgi:app`` from the repository root (so
gunicorn.conf.py and its hooks are used) configured through HITL_* variables;
``serve_server(...)`` runs ``python -m hitl_pruner serve URL --port P ...``. Both are context
managers yielding a :class:`Server`: a small HTTP client plus the process and its combined
stdout/stderr, which is written to a file under the test's tmp_path and stays readable after
the process has stopped.

``wait_proxy_ready(proxy)`` and ``close_proxy(proxy)`` do what Optuna's ``GrpcStorageProxy``
methods of those names do (Optuna >= 4.3), on Optuna 4.2 too, which has the proxy but not them.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from pathlib import Path
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING
from typing import Any
from typing import Callable
from typing import Iterator
from typing import Literal
from typing import Mapping
from typing import Sequence

import pytest
import requests

if TYPE_CHECKING:
    from optuna.storages import GrpcStorageProxy

REPO_ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
HTTP_TIMEOUT = 30.0
Ready = Literal["http", "none"]
# How gunicorn and serve (before gunicorn: cli.check_port_free) say that the port is taken: by
# another test's server, between free_port() and the bind. (hitl-pruner refuses port 0.)
PORT_TAKEN = re.compile(r"Address already in use|port \d+ on \S+ is in use")

_counter = itertools.count(1)


def free_port() -> int:
    """A loopback port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any HITL_ setting (the tests' own HITL_TEST_* stay)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("HITL_") or k.startswith("HITL_TEST_")
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class Reply:
    """An HTTP answer: status, headers (case-insensitive), body, and the parsed JSON if any."""

    def __init__(self, response: requests.Response) -> None:
        self.status = response.status_code
        self.headers = response.headers
        self.content = response.content
        self.text = response.text

    @property
    def json(self) -> Any:
        if not self.content:
            return None
        return json.loads(self.content)

    @property
    def outcome(self) -> dict[str, Any] | None:
        raw = self.headers.get("X-Hitl-Outcome")
        return json.loads(raw) if raw is not None else None

    def __repr__(self) -> str:
        return f"<Reply {self.status} {dict(self.headers)!r} {self.text[:300]!r}>"


class Server:
    def __init__(
        self, name: str, cmd: Sequence[str], env: Mapping[str, str], cwd: Path, log_path: Path,
        port: int,
    ) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.env = dict(env)
        self.cwd = cwd
        self.log_path = log_path
        self.port = port
        self.base = f"http://{HOST}:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    # -- the process ---------------------------------------------------------------------

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    @property
    def output(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def describe(self) -> str:
        return (
            f"{self.name}: {' '.join(self.cmd)} (returncode {self.returncode})\n"
            f"--- output ({self.log_path}) ---\n{self.output}"
        )

    def check_alive(self) -> None:
        if self.returncode is not None:
            pytest.fail(f"the server died\n{self.describe()}", pytrace=False)

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.cmd,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own process group: stop() can reach gunicorn's workers too, and only them.
                start_new_session=True,
            )

    def wait_listening(self, timeout: float = START_TIMEOUT) -> bool:
        """Until gunicorn says it listens on our port: True; False if the port was taken.

        Also True if the process stopped for another reason, or said nothing in time: that is
        for wait_ready() or the test to find out."""
        listening = f"Listening at: http://{HOST}:{self.port} "
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            output = self.output
            if listening in output:
                return True
            if PORT_TAKEN.search(output):
                return False
            if self.returncode is not None:
                return True
            time.sleep(0.05)
        return True

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Until GET /api/meta answers 200; fails with the output if the process dies first."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            try:
                with requests.get(self.base + "/api/meta", timeout=2) as response:
                    if response.status_code == 200:
                        return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"no 200 from GET /api/meta within {timeout:.0f} s\n{self.describe()}",
                    pytrace=False,
                )
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL the whole process group at once."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(STOP_TIMEOUT)

    def stop(self) -> int | None:
        """SIGTERM (gunicorn's graceful stop), wait, then SIGKILL the whole process group."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(STOP_TIMEOUT)
        return proc.returncode

    # -- HTTP ------------------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> Reply:
        kwargs.setdefault("timeout", HTTP_TIMEOUT)
        kwargs.setdefault("allow_redirects", False)
        with requests.Session() as session:
            with session.request(method, self.base + path, **kwargs) as response:
                return Reply(response)

    def get(self, path: str, **kwargs: Any) -> Reply:
        return self.request("GET", path, **kwargs)

    def get_json(self, path: str) -> Any:
        reply = self.get(path)
        assert reply.status == 200, f"GET {path}: {reply!r}"
        return reply.json

    def put_note(self, study_id: int, trial_id: int, version: int, body: str) -> Reply:
        return self.request(
            "PUT",
            f"/api/studies/{study_id}/{trial_id}/note",
            json={"version": version, "body": body},
        )

    def put_raw(self, path: str, data: bytes, content_type: str = "application/json") -> Reply:
        return self.request("PUT", path, data=data, headers={"Content-Type": content_type})

    def trial_states(self, study_id: int) -> dict[int, str]:
        """trial_id -> state ("Running", "Pruned", ...) from the dashboard's study detail."""
        detail = self.get_json(f"/api/studies/{study_id}")
        return {t["trial_id"]: t["state"] for t in detail["trials"]}

    def trial_detail(self, study_id: int, trial_id: int) -> dict[str, Any]:
        detail = self.get_json(f"/api/studies/{study_id}")
        (trial,) = [t for t in detail["trials"] if t["trial_id"] == trial_id]
        return dict(trial)


@contextlib.contextmanager
def running(
    name: str,
    cmd_for_port: Callable[[int], Sequence[str]],
    *,
    tmp_path: Path,
    env: Mapping[str, str] | None = None,
    env_for_port: Callable[[int], Mapping[str, str]] | None = None,
    cwd: Path | None = None,
    ready: Ready = "http",
) -> Iterator[Server]:
    """Start a server on a free port, wait until it answers, yield it, and stop it."""
    # gunicorn >= 25 opens a control socket at $XDG_RUNTIME_DIR/gunicorn.ctl (else in
    # ~/.gunicorn): one directory per server, so that servers running at once do not share it.
    # A short path: a Unix socket's path must stay under 108 bytes.
    runtime_dir = tempfile.mkdtemp(prefix="hitl-e2e-")
    try:
        yield from _running(
            name, cmd_for_port, tmp_path=tmp_path,
            env={"XDG_RUNTIME_DIR": runtime_dir, **(env or {})},
            env_for_port=env_for_port, cwd=cwd, ready=ready,
        )
    finally:
        shutil.rmtree(runtime_dir, ignore_errors=True)


def _running(
    name: str,
    cmd_for_port: Callable[[int], Sequence[str]],
    *,
    tmp_path: Path,
    env: Mapping[str, str],
    env_for_port: Callable[[int], Mapping[str, str]] | None,
    cwd: Path | None,
    ready: Ready,
) -> Iterator[Server]:
    attempts = 3
    for attempt in range(attempts):
        port = free_port()
        extra = dict(env)
        if env_for_port is not None:
            extra.update(env_for_port(port))
        log_path = tmp_path / f"{name}-{next(_counter)}.log"
        server = Server(name, cmd_for_port(port), child_env(extra), cwd or tmp_path, log_path, port)
        server.start()
        try:
            # Another test's server took the port between free_port() and the bind: the start
            # goes again on another port (gunicorn would only retry the same one for 5 s).
            if not server.wait_listening() and attempt + 1 < attempts:
                server.kill()  # it has no worker yet, and would not stop before giving up
                continue
            if ready == "http":
                server.wait_ready()
            try:
                yield server
            except BaseException:
                # What the server said goes with a failed test, as pytest's captured stderr: a
                # timeout seen only in the browser may have its cause here.
                sys.stderr.write(f"\n{server.describe()}\n")
                raise
            return
        finally:
            server.stop()


def gunicorn_server(
    storage_url: str,
    tmp_path: Path,
    *,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    interval: float = 0.5,
    ready: Ready = "http",
) -> contextlib.AbstractContextManager[Server]:
    """``python -m gunicorn [args] wsgi:app`` in the repository root, set up by HITL_* only."""
    settings = {"HITL_STORAGE_URL": storage_url, "HITL_INTERVAL": str(interval)}
    settings.update(env or {})
    return running(
        "gunicorn",
        lambda port: [sys.executable, "-m", "gunicorn", *args, "wsgi:app"],
        tmp_path=tmp_path,
        env=settings,
        # gunicorn.conf.py binds to HITL_HOST:HITL_PORT.
        env_for_port=lambda port: {"HITL_HOST": HOST, "HITL_PORT": str(port)},
        cwd=REPO_ROOT,
        ready=ready,
    )


def serve_server(
    storage_url: str,
    tmp_path: Path,
    *,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    interval: float = 0.5,
    ready: Ready = "http",
) -> contextlib.AbstractContextManager[Server]:
    """``python -m hitl_pruner serve URL --host 127.0.0.1 --port P --interval I [args]``."""
    return running(
        "serve",
        lambda port: [
            sys.executable, "-m", "hitl_pruner", "serve", storage_url,
            "--host", HOST, "--port", str(port), "--interval", str(interval), *args,
        ],
        tmp_path=tmp_path,
        env=env,
        ready=ready,
    )


def run_to_exit(
    cmd: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    """Run a command that should exit by itself; fail (and kill it) if it does not."""
    runtime_dir = tempfile.mkdtemp(prefix="hitl-e2e-")
    try:
        proc = subprocess.Popen(
            list(cmd), cwd=cwd, env=child_env({"XDG_RUNTIME_DIR": runtime_dir, **(env or {})}),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(
                f"{' '.join(cmd)} did not exit within {timeout:.0f} s\n"
                f"--- stdout ---\n{out}\n--- stderr ---\n{err[-6000:]}",
                pytrace=False,
            )
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        shutil.rmtree(runtime_dir, ignore_errors=True)


def wait_for(
    condition: Callable[[], Any],
    *,
    timeout: float = 20.0,
    what: str = "the condition",
    servers: Sequence[Server] = (),
    interval: float = 0.1,
) -> Any:
    """Poll until condition() is truthy and return its value; fail if a server dies first."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        for server in servers:
            server.check_alive()
        if time.monotonic() > deadline:
            logs = "\n".join(s.describe() for s in servers)
            pytest.fail(
                f"timed out after {timeout:.0f} s waiting for {what}\n{logs}", pytrace=False
            )
        time.sleep(interval)


def wait_proxy_ready(proxy: GrpcStorageProxy, timeout: float) -> None:
    """Until the gRPC proxy server ``proxy`` talks to accepts a connection; ConnectionError after
    ``timeout`` s. ``proxy.wait_server_ready(timeout)`` where Optuna has it (4.3 added it)."""
    wait_server_ready = getattr(proxy, "wait_server_ready", None)
    if wait_server_ready is not None:
        wait_server_ready(timeout=timeout)
        return
    import grpc

    # Optuna 4.2: what 4.3's wait_server_ready does, on a channel of its own to the same address
    # (4.2's proxy keeps it as _host and _port).
    try:
        with grpc.insecure_channel(f"{proxy._host}:{proxy._port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError as exc:
        raise ConnectionError("GRPC connection timeout") from exc


def close_proxy(proxy: GrpcStorageProxy) -> None:
    """Close ``proxy``'s gRPC channel, ending its connection; the proxy is unusable afterwards.
    ``proxy.close()`` where Optuna has it (4.3 added it)."""
    close = getattr(proxy, "close", None)
    if close is not None:
        close()
        return
    # Optuna 4.2 keeps no handle on its channel: it hands grpc.insecure_channel(...) straight to
    # the stub, and only the stub and the stub's cache hold it. Dropping both frees the channel,
    # and gRPC closes its connection when it is freed (tests/test_grpc_proxy.py checks that).
    del proxy._stub, proxy._cache
