"""Real gunicorn servers for scripts/bench_latency.py: start one on a free loopback port, wait
until it serves, read its processes' CPU time, stop it; and a lean keep-alive HTTP client.

Servers run from the repository root, so gunicorn reads ./gunicorn.conf.py (its hooks start
the sweep after the fork, gthread with 4 threads) for ours (``wsgi:app``) and for the bare
dashboard (``_bench_bare:app``) alike: the same gunicorn settings on both sides of an A/B.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
from pathlib import Path
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any
from typing import Iterator

REPO_ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_libc = ctypes.CDLL(None, use_errno=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def children(pid: int) -> list[int]:
    """The pids whose parent is pid (gunicorn's workers)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name, in parentheses, may contain spaces: split after it.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry))
    return sorted(found)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a whole process, all its threads, dead ones included.

    The process's CPU-time clock has nanosecond resolution; /proc/<pid>/stat's utime + stime
    (clock ticks, 10 ms) is the fallback.
    """
    clock = ctypes.c_int()
    if _libc.clock_getcpuclockid(pid, ctypes.byref(clock)) == 0:
        try:
            return time.clock_gettime(clock.value)
        except OSError:
            pass
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


class ServerDied(Exception):
    pass


class Server:
    """``python -m gunicorn <app>`` from the repository root, with HITL_* settings in env."""

    def __init__(self, app: str, env: dict[str, str], log_path: Path,
                 extra_args: tuple[str, ...] = (), cpus: set[int] | None = None) -> None:
        self.port = free_port()
        self.app = app
        self.env = {
            # None of the caller's HITL_* or gunicorn settings: ours only.
            **{k: v for k, v in os.environ.items()
               if not k.startswith("HITL_") and k != "WEB_CONCURRENCY"},
            "PYTHONUNBUFFERED": "1",
            "HITL_HOST": HOST,
            "HITL_PORT": str(self.port),
            **env,
        }
        # taskset execs gunicorn in its own process (same pid); the workers it forks inherit
        # the CPUs.
        pin = ["taskset", "-c", ",".join(map(str, sorted(cpus)))] if cpus else []
        self.cmd = [*pin, sys.executable, "-m", "gunicorn", *extra_args, app]
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def workers(self) -> list[int]:
        return children(self.pid)

    def pids(self) -> list[int]:
        return [self.pid, *self.workers()]

    def cpu(self, pids: list[int] | None = None) -> float:
        """CPU seconds of the master and its workers (or of the pids given) so far."""
        return sum(cpu_seconds(pid) for pid in (pids or self.pids()))

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def start(self, n_workers: int = 1) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.cmd, cwd=REPO_ROOT, env=self.env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise ServerDied(f"{self.app} exited with {self.proc.returncode}:\n"
                                 f"{self.output()}")
            try:
                if get(self.port, "/api/meta")[0] == 200 and len(self.workers()) >= n_workers:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ServerDied(f"{self.app} did not answer within {START_TIMEOUT:.0f} s:\n"
                                 f"{self.output()}")
            time.sleep(0.1)

    def wait_swept(self, timeout: float = START_TIMEOUT) -> None:
        """Until this server's sweep has run once (its first sweep drains what install's
        bootstrap queued), from /healthz."""
        deadline = time.monotonic() + timeout
        status, body = 0, b""
        while time.monotonic() < deadline:
            status, body = get(self.port, "/healthz")
            with contextlib.suppress(ValueError):
                sweep = json.loads(body).get("sweep", {})
                if sweep.get("active") and sweep.get("seconds_since_last_run") is not None:
                    return
            time.sleep(0.1)
        raise ServerDied(f"{self.app}: the sweep did not run within {timeout:.0f} s "
                         f"(/healthz: {status} {body[:300]!r})\n{self.output()}")

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(STOP_TIMEOUT)


@contextlib.contextmanager
def running(app: str, env: dict[str, str], log_path: Path, *, n_workers: int = 1,
            extra_args: tuple[str, ...] = (), cpus: set[int] | None = None) -> Iterator[Server]:
    """A started server (on ``cpus`` only, if given), stopped on leaving."""
    server = Server(app, env, log_path, extra_args, cpus)
    try:
        server.start(n_workers)
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def pinned(cpus: set[int] | None) -> Iterator[None]:
    """This thread, and the threads it starts meanwhile (the client's), on ``cpus`` only."""
    if not cpus:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


# --- HTTP ------------------------------------------------------------------------------------

# What a browser sends, so the dashboard takes the path it takes for one (it serves the
# bundle gzipped, and reads Accept-Encoding without a default).
BROWSER_HEADERS = "Accept: */*\r\nAccept-Encoding: gzip, deflate, br\r\n"


class Connection:
    """One keep-alive HTTP/1.1 connection, with as little client work per request as we can:
    a prebuilt request, the body read by Content-Length (gunicorn sends one, or closes)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None
        self.buf = b""

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((HOST, self.port), timeout=60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.buf = sock, b""
        return sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def request(self, raw: bytes) -> tuple[int, bytes]:
        """Send a prebuilt request; return (status, body). Reconnects once if the server
        closed the idle connection."""
        for attempt in (1, 2):
            sock = self.sock or self._connect()
            try:
                sock.sendall(raw)
                return self._response(sock)
            except (ConnectionError, EOFError):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _recv(self, sock: socket.socket) -> None:
        data = sock.recv(1 << 20)
        if not data:
            raise EOFError("the server closed the connection")
        self.buf += data

    def _response(self, sock: socket.socket) -> tuple[int, bytes]:
        while b"\r\n\r\n" not in self.buf:
            self._recv(sock)
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = None
        close = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        if status in (204, 304) or status < 200:  # no body, whatever the headers say
            self.buf = rest
            if close:
                self.close()
            return status, b""
        if length is None:  # no length: the body runs until the server closes
            self.buf = rest
            with contextlib.suppress(EOFError):
                while True:
                    self._recv(sock)
            body, self.buf = self.buf, b""
            self.close()
            return status, body
        chunks = [rest]
        have = len(rest)
        while have < length:
            data = sock.recv(max(length - have, 1 << 16))
            if not data:
                raise EOFError("the server closed the connection mid-body")
            chunks.append(data)
            have += len(data)
        data = b"".join(chunks)
        body, self.buf = data[:length], data[length:]
        if close:
            self.close()
        return status, body


def build_request(method: str, path: str, port: int, body: Any = None) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n{BROWSER_HEADERS}"
    if body is None:
        return (head + "\r\n").encode()
    data = json.dumps(body).encode()
    return (head + f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
            ).encode() + data


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = Connection(port)
    try:
        return conn.request(build_request("GET", path, port).replace(
            b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1))
    finally:
        conn.close()


def hammer(port: int, raw: bytes, n: int, concurrency: int) -> tuple[float, list[float]]:
    """Send the request n times over `concurrency` keep-alive connections; the wall time,
    and each request's time.

    Every answer must be a 200; the connections are opened before the clock starts.
    """
    [(_, took, times)] = _drive([(port, raw)], concurrency, n=n)
    return took, times


def hammer_together(targets: list[tuple[int, bytes]], seconds: float,
                    concurrency: int) -> list[tuple[int, float, list[float]]]:
    """Send each (port, request) target over ``concurrency`` keep-alive connections of its own,
    every target at the same time, for about ``seconds``; per target, the requests answered, the
    wall time and each request's time.

    Run side by side, two servers meet the same slow patches of a shared machine (another VM's
    burst, a frequency change) at the same moments, so their ratio keeps what differs between
    them and loses most of what happened to both. Every answer must be a 200.
    """
    return _drive(targets, concurrency, seconds=seconds)


def _drive(targets: list[tuple[int, bytes]], concurrency: int, *, n: int | None = None,
           seconds: float | None = None) -> list[tuple[int, float, list[float]]]:
    """Each (port, request) target over ``concurrency`` connections of its own, all starting
    together: ``n`` requests per target, or as many as fit in ``seconds``. Per target, the
    requests answered, the wall time to its last answer and each request's time."""
    conns = [[Connection(port) for _ in range(concurrency)] for port, _ in targets]
    for group in conns:
        for conn in group:
            conn._connect()
    per_conn = [math.inf] * concurrency if n is None else [
        n // concurrency + (i < n % concurrency) for i in range(concurrency)
    ]
    errors: list[BaseException] = []
    times: list[list[float]] = [[] for _ in targets]
    walls: list[float] = [0.0 for _ in targets]
    start_line = threading.Barrier(len(targets) * concurrency + 1)
    started = 0.0

    def run(k: int, conn: Connection, raw: bytes, count: float) -> None:
        clock = time.perf_counter
        try:
            start_line.wait()
            end = math.inf if seconds is None else started + seconds
            answered = 0
            while answered < count:
                sent = clock()
                if sent >= end:
                    break
                status, body = conn.request(raw)
                done = clock()
                answered += 1
                times[k].append(done - sent)
                walls[k] = max(walls[k], done - started)
                if status != 200:
                    raise RuntimeError(f"answered {status}: {body[:200]!r}")
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k, conn, raw, count))
               for k, (_, raw) in enumerate(targets)
               for conn, count in zip(conns[k], per_conn)]
    for thread in threads:
        thread.start()
    # Set before the threads pass the start line, so each reads it after.
    started = time.perf_counter()
    start_line.wait()
    for thread in threads:
        thread.join()
    for group in conns:
        for conn in group:
            conn.close()
    if errors:
        raise RuntimeError(f"{targets[0][1].split(b' HTTP')[0].decode()}: {errors[0]}")
    return [(len(t), wall, t) for t, wall in zip(times, walls)]
