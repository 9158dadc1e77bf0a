"""Where a pass-through request's time goes in hitl-pruner's stack (issue 11, item 3), per layer.

In process, on a SQLite study of 1,000 trials, the stack ``gunicorn wsgi:app`` serves
(``behind_proxy(create_app(settings))``, every HITL_* setting at its default) against the bare
``optuna_dashboard.wsgi(storage)``, for the endpoints a dashboard page polls or loads:

bytecodes
    Python bytecodes executed for one request (``sys.settrace`` with opcode events), ours
    minus bare, split by our module; and the extra Python and C calls. Deterministic: the
    same code gives the same count on any machine, so a change to the path shows here
    exactly, where timings would drown it in noise.
time
    Wall time per request, us, medians of --calls calls per app, the apps called in turn
    (order reversed every call), for the bare dashboard and for the stack cut at each layer
    (the stack from that layer inwards), so each layer's share is the step to the next; at
    most --calls calls, fewer where they would take over --seconds (the study detail).
    On a loaded or 2-core machine the steps are a few tenths of a us apart and noisy; the
    bytecode counts are the figure to compare changes by.

    python scripts/profile_passthrough.py [--calls 5000] [--seconds 20] [--paths /api/meta,...]

gunicorn adds its own per-header work for the two framing headers (CrossOriginGuard), not
counted here; ``scripts/bench_latency.py --only passthrough`` measures the whole under gunicorn.
"""

from __future__ import annotations

import argparse
from collections import Counter
import io
import logging
from pathlib import Path
import statistics
import sys
import tempfile
import time
from typing import Any
from typing import Callable
from wsgiref.util import FileWrapper

import optuna
from optuna.storages import RDBStorage
import optuna_dashboard

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_core  # noqa: E402

from hitl_pruner.app import create_app  # noqa: E402
from hitl_pruner.config import resolve  # noqa: E402
from hitl_pruner.prefix import behind_proxy  # noqa: E402

App = Callable[..., Any]
TRIALS = 1000


def environ(path: str) -> dict[str, Any]:
    """What gunicorn gives a plain GET from a browser on the same host."""
    path, _, query = path.partition("?")
    return {
        "REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": query, "SCRIPT_NAME": "",
        "RAW_URI": path, "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8080",
        "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "50000",
        "HTTP_HOST": "127.0.0.1:8080", "HTTP_USER_AGENT": "profile", "HTTP_ACCEPT": "*/*",
        "HTTP_ACCEPT_ENCODING": "gzip, deflate", "HTTP_CONNECTION": "keep-alive",
        "wsgi.input": io.BytesIO(b""), "wsgi.errors": sys.stderr, "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http", "wsgi.multithread": True, "wsgi.multiprocess": False,
        "wsgi.run_once": False, "wsgi.file_wrapper": FileWrapper,
    }


def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
    if not status.startswith("200"):
        raise RuntimeError(f"answered {status}")
    return lambda data: None


def call(app: App, env: dict[str, Any]) -> None:
    result = app(env.copy(), start_response)
    try:
        for _ in result:
            pass
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()


def layers(stack: App) -> list[App]:
    """The stack's layers, outermost first, down to (not including) the dashboard."""
    found = []
    app: Any = stack
    while True:
        inner = vars(app).get("application") or vars(app).get("app")
        if inner is None:
            return found
        found.append(app)
        app = inner


def bytecodes(app: App, env: dict[str, Any]) -> tuple[Counter[str], int, int]:
    """Bytecodes run by one request, per file; and the Python and C calls made."""
    ops: Counter[str] = Counter()
    calls: Counter[str] = Counter()

    def trace(frame: Any, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        if event == "opcode":
            ops[frame.f_code.co_filename] += 1
        return trace

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event in ("call", "c_call"):
            calls[event] += 1

    sys.settrace(trace)
    sys.setprofile(profile)
    try:
        call(app, env)
    finally:
        sys.settrace(None)
        sys.setprofile(None)
    return ops, calls["call"], calls["c_call"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=5000,
                        help="timed calls per app and endpoint, at most (default 5000)")
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="time budget per endpoint for the timed calls (default 20)")
    parser.add_argument("--paths", default=None,
                        help="comma-separated endpoints (default: the study list, the study "
                        "detail with and without after=, the bundle, /api/meta)")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="hitl-profile-") as tmp:
        url = f"sqlite:///{tmp}/profile.db"
        study_id, _, _ = bench_core.populate(url, "profile", TRIALS, 10)
        settings = resolve(environ={"HITL_STORAGE_URL": url})
        ours = behind_proxy(create_app(settings, autostart=False), settings)
        bare = optuna_dashboard.wsgi(RDBStorage(url))
        paths = args.paths.split(",") if args.paths else [
            "/api/studies", f"/api/studies/{study_id}",
            f"/api/studies/{study_id}?after={TRIALS - 10}", "/static/bundle.js", "/api/meta",
        ]
        stack = layers(ours)
        print(f"Python {sys.version.split()[0]}, optuna {optuna.__version__}, optuna-dashboard "
              f"{optuna_dashboard.__version__}; {TRIALS:,} trials on SQLite")
        print("\n## Bytecodes per request, ours minus bare")
        print("| endpoint | bare | ours | added | " + " | ".join(
            type(layer).__module__.rsplit(".", 1)[1] for layer in stack)
            + " | other | Python calls | C calls |")
        print("|---" * (len(stack) + 7) + "|")
        for path in paths:
            env = environ(path)
            for app in (bare, ours, bare, ours):
                call(app, env)  # warm: the dashboard's cache filled, the watcher's look done
            b_ops, b_py, b_c = bytecodes(bare, env)
            o_ops, o_py, o_c = bytecodes(ours, env)
            ours_files = [module_file(type(layer)) for layer in stack]
            per_layer = [o_ops[f] - b_ops[f] for f in ours_files]
            added = sum(o_ops.values()) - sum(b_ops.values())
            other = added - sum(per_layer)
            print(f"| {path} | {sum(b_ops.values()):,} | {sum(o_ops.values()):,} | {added:+,} | "
                  + " | ".join(f"{n:+}" for n in per_layer)
                  + f" | {other:+} | {o_py - b_py:+} | {o_c - b_c:+} |")
        print("\n## Time per request, us (medians; apps in turn)")
        names = ["bare"] + [type(layer).__name__ for layer in stack]
        print("| endpoint | " + " | ".join(names) + " | added |")
        print("|---" * (len(names) + 2) + "|")
        for path in paths:
            env = environ(path)
            apps = [bare, *stack]
            samples: list[list[float]] = [[] for _ in apps]
            clock = time.perf_counter
            started = clock()
            call(bare, env)
            calls = max(50, min(args.calls, round(
                args.seconds / ((clock() - started) * len(apps)))))
            for i in range(calls):
                order = range(len(apps)) if i % 2 else range(len(apps) - 1, -1, -1)
                for k in order:
                    started = clock()
                    call(apps[k], env)
                    samples[k].append(clock() - started)
            medians = [statistics.median(s) * 1e6 for s in samples]
            print(f"| {path} ({calls} calls) | " + " | ".join(f"{m:.1f}" for m in medians)
                  + f" | {medians[1] - medians[0]:+.1f} |")


def module_file(cls: type) -> str:
    return str(sys.modules[cls.__module__].__file__)


if __name__ == "__main__":
    main()
