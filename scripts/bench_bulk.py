"""Time the dashboard's bulk action (issue 10 item 2): 500 trials in one request.

Per backend, on a fresh database: a study of ``--trials`` trials of which ``--running`` are
RUNNING (no cooperative worker, so each is forced at once) and the rest COMPLETE, one in ten
with a note already. In process (``create_app``), this times ``POST
/hitl/api/studies/<id>/bulk`` with ``{"action": "prune", "filter": {"state": "RUNNING"}}``
(every RUNNING trial: a note version, a state change and an audit row each), a dry run of the
same first, then an undo of ``--relabel`` COMPLETE trials relabelled FAIL (a retroactive
relabel and its undo). Seconds per request, and SQL statements (an executemany counts once).

    python scripts/bench_bulk.py [--backends postgresql,sqlite,mysql] [--trials 2000]
        [--running 500] [--relabel 500]
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
import sys
import tempfile
import time
from typing import Any

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).parent))
from benchdb import Unavailable  # noqa: E402
from benchdb import build_study  # noqa: E402
from benchdb import database  # noqa: E402

from hitl_pruner import Settings  # noqa: E402
from hitl_pruner import create_app  # noqa: E402


def post(app: Any, path: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    data = json.dumps(body).encode()
    env = {
        "REQUEST_METHOD": "POST", "PATH_INFO": path, "QUERY_STRING": "",
        "SERVER_NAME": "bench", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
        "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(data)),
        "wsgi.input": io.BytesIO(data), "wsgi.errors": io.StringIO(), "wsgi.url_scheme": "http",
        "wsgi.version": (1, 0), "wsgi.multithread": False, "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    seen: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        seen["status"] = status
        return lambda _: None

    out = b"".join(app(env, start_response))
    return seen["status"], json.loads(out)


def timed(app: Any, engine: sa.Engine, path: str, body: dict[str, Any]) -> tuple[float, int,
                                                                                 dict[str, Any]]:
    statements = [0]

    def count(*args: object) -> None:
        statements[0] += 1

    sa.event.listen(engine, "before_cursor_execute", count)
    try:
        start = time.perf_counter()
        status, answer = post(app, path, body)
        took = time.perf_counter() - start
    finally:
        sa.event.remove(engine, "before_cursor_execute", count)
    assert status.startswith("200"), (status, answer)
    return took, statements[0], answer


def bench(backend: str, args: argparse.Namespace, tmp: Path) -> None:
    with database(backend, tmp) as url:
        study = build_study(url, "bulk", args.trials, args.running)
        app = create_app(Settings(storage_url=url), autostart=False)
        engine = app.applier.store.engine
        path = f"/hitl/api/studies/{study.study_id}/bulk"
        running = {"action": "prune", "filter": {"state": "RUNNING"}, "reason": "bench"}
        took, n, answer = timed(app, engine, path, {**running, "dry_run": True})
        print(f"{backend}: dry run of PRUNE on {answer['matched']} RUNNING trials: "
              f"{took:.2f} s, {n} statements; {answer['counts']}")
        took, n, answer = timed(app, engine, path, running)
        print(f"{backend}: PRUNE {answer['matched']} RUNNING trials: {took:.2f} s, "
              f"{n} statements; {answer['counts']}")
        numbers = list(range(args.relabel))
        took, n, answer = timed(app, engine, path, {"action": "fail", "trials": numbers})
        print(f"{backend}: FAIL {answer['matched']} COMPLETE trials (retroactive): "
              f"{took:.2f} s, {n} statements; {answer['counts']}")
        took, n, answer = timed(app, engine, path, {"action": "undo", "trials": numbers})
        print(f"{backend}: undo {answer['matched']} relabels: {took:.2f} s, "
              f"{n} statements; {answer['counts']}")
        engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="postgresql")
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--running", type=int, default=500)
    parser.add_argument("--relabel", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends.split(","):
            try:
                bench(backend, args, Path(tmp))
            except Unavailable as exc:
                print(f"{backend}: skipped ({exc})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
