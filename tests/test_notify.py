"""--notify-url: one JSON POST per human action, to a real local HTTP receiver that fails on
purpose (500s, a hang, a refused connection), sent off the request path (notify.py)."""

from __future__ import annotations

import http.server
import json
import logging
import os
from pathlib import Path
import socket
import statistics
import threading
import time
from typing import Any
from typing import Iterator

from helpers import app_for
from helpers import audit_rows
from helpers import call
from helpers import make_study
from helpers import save
from helpers import state
import optuna
from optuna.trial import TrialState
from optuna_dashboard import save_note
import pytest

import hitl_pruner
from hitl_pruner import cli
from hitl_pruner import notify
from hitl_pruner.audit import AuditEntry
from hitl_pruner.config import ConfigError
from hitl_pruner.config import resolve
from hitl_pruner.notify import Notifier


class Receiver:
    """An HTTP server on a free port that records each POST and answers as ``plan`` says:
    a status code, or "hang" (answer nothing until released); then 200 once the plan is used."""

    def __init__(self, plan: list[int | str] | None = None, port: int = 0) -> None:
        self.plan = list(plan or [])
        self.bodies: list[dict[str, Any]] = []
        self.attempts = 0
        self.release = threading.Event()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with lock:
                    receiver.attempts += 1
                    answer = receiver.plan.pop(0) if receiver.plan else 200
                if answer == "hang":
                    receiver.release.wait(30)
                    return
                if answer == 200:
                    with lock:
                        receiver.bodies.append(json.loads(body))
                self.send_response(int(answer))
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        lock = threading.Lock()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/secret-token"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.bodies) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.bodies


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    made: list[Receiver] = []
    yield made
    for receiver in made:
        receiver.close()


@pytest.fixture(autouse=True)
def notifiers_closed() -> Iterator[None]:
    """Each test's notifiers (one per URL and process) stop with it."""
    yield
    with notify._lock:
        for notifier in notify._notifiers.values():
            notifier.close()
        notify._notifiers.clear()


def receiver(receivers: list[Receiver], plan: list[int | str] | None = None) -> Receiver:
    made = Receiver(plan)
    receivers.append(made)
    return made


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def entry(number: int = 0) -> AuditEntry:
    return AuditEntry(
        study_id=1, study_name="s <!channel>", trial_id=number + 1, trial_number=number,
        from_state=TrialState.COMPLETE, to_state=TrialState.PRUNED, note_version=2,
        user="ann", source="note-save", retroactive=True, undo=False,
    )


def script_note(study: optuna.Study, trial_id: int, body: str) -> None:
    save_note(optuna.Trial(study, trial_id), body)


def test_every_path_that_writes_an_audit_row_posts_it_once_in_slacks_shape(
    storage_url: str, receivers: list[Receiver]
) -> None:
    """One POST per human action, whichever path acted: a note saved in the dashboard, the Fail
    Trial button, a note written by a script and applied by the sweep, and the command line.
    A note without a command, which changes nothing, posts nothing."""
    hook = receiver(receivers)
    study, ids = make_study(storage_url)
    app = app_for(storage_url, notify_url=hook.url)
    app.sweeper.run_once()
    user = {"REMOTE_USER": "ann"}
    assert save(app, study._study_id, ids["running"], 1, "PRUNE", environ=user).status == 204
    assert save(app, study._study_id, ids["complete"], 1, "just a remark").status == 204
    r = call(app, "POST", f"/api/trials/{ids['running2']}/tell", {"state": "Fail"})
    assert r.status in (200, 204), r.body
    script_note(study, ids["complete"], "FAIL")
    assert app.sweeper.run_once().applied == 1
    number = study._storage.get_trial(ids["complete2"]).number
    assert cli.main(["prune", storage_url, "--study", "s", "--trials", str(number),
                     "--user", "bob", "--notify-url", hook.url]) == 0

    bodies = hook.wait_for(4)
    time.sleep(0.3)  # nothing more comes
    assert len(bodies) == 4 == len(audit_rows(storage_url))
    by_trial = {b["hitl_pruner"]["trial_id"]: b for b in bodies}
    assert {t: b["hitl_pruner"]["source"] for t, b in by_trial.items()} == {
        ids["running"]: "note-save", ids["running2"]: "fail-button",
        ids["complete"]: "sweep", ids["complete2"]: "cli",
    }
    first = by_trial[ids["running"]]
    assert first["text"].startswith("hitl-pruner: study 's' trial #")
    assert "RUNNING \u2192 PRUNED" in first["text"] and "'ann'" in first["text"]
    assert first["hitl_pruner"]["user"] == "ann" and first["hitl_pruner"]["to"] == "PRUNED"
    assert by_trial[ids["complete2"]]["hitl_pruner"]["user"] == "bob"
    assert "(retroactive relabel)" in by_trial[ids["complete"]]["text"]


def test_retries_deliver_after_the_receiver_answers_500_then_recovers(
    receivers: list[Receiver],
) -> None:
    hook = receiver(receivers, [500, 503, 200])
    notifier = Notifier(hook.url, first_pause=0.05)
    notifier.send([entry()])
    assert notifier.flush(10)
    assert hook.attempts == 3 and len(hook.bodies) == 1
    stats = notifier.stats()
    assert (stats.sent, stats.retries, stats.failed, stats.dropped) == (1, 2, 0, 0)
    # Slack reads <...> as a mention: the study name's is escaped.
    assert "&lt;!channel&gt;" in hook.bodies[0]["text"] and "<!" not in hook.bodies[0]["text"]


def test_a_receiver_that_hangs_times_out_and_the_message_is_sent_again(
    receivers: list[Receiver],
) -> None:
    hook = receiver(receivers, ["hang"])
    notifier = Notifier(hook.url, timeout=0.3, first_pause=0.05)
    started = time.monotonic()
    notifier.send([entry()])
    assert notifier.flush(10)
    assert hook.attempts == 2 and len(hook.bodies) == 1
    assert notifier.stats().retries == 1
    assert time.monotonic() - started < 3


def test_a_refused_connection_is_retried_until_the_receiver_listens(
    receivers: list[Receiver],
) -> None:
    port = free_port()
    notifier = Notifier(f"http://127.0.0.1:{port}/hook", attempts=20, first_pause=0.05,
                        max_pause=0.1)
    notifier.send([entry()])
    time.sleep(0.3)
    assert notifier.stats().retries >= 1  # refused meanwhile
    hook = Receiver(port=port)
    receivers.append(hook)
    assert notifier.flush(10)
    assert len(hook.bodies) == 1 and notifier.stats().sent == 1


def test_a_receiver_that_never_recovers_is_given_up_with_a_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    notifier = Notifier(f"http://127.0.0.1:{free_port()}/hook", attempts=3, first_pause=0.01)
    with caplog.at_level(logging.INFO, "hitl_pruner"):
        notifier.send([entry()])
        assert notifier.flush(5)
    assert notifier.stats().failed == 1 and notifier.stats().retries == 2
    assert "gave up on a message to http://127.0.0.1:" in caplog.text
    assert "/hook" not in caplog.text  # a webhook's path is its secret


def test_a_4xx_is_not_retried(receivers: list[Receiver]) -> None:
    hook = receiver(receivers, [400])
    notifier = Notifier(hook.url, first_pause=0.01)
    notifier.send([entry()])
    assert notifier.flush(5)
    assert hook.attempts == 1 and notifier.stats().failed == 1


def _save_times(app: Any, study_id: int, trial_id: int, rounds: int) -> list[float]:
    """Seconds per note save, each forcing a change (and so an audit row and a message):
    PRUNE, then the command taken out again (undo), over and over."""
    times = []
    version = 0
    for i in range(rounds):
        version += 1
        body = "PRUNE" if i % 2 == 0 else "kept after all"
        started = time.perf_counter()
        r = save(app, study_id, trial_id, version, body)
        times.append(time.perf_counter() - started)
        assert r.status == 204 and r.outcome is not None and r.outcome["action"] == "applied"
    return times


def test_a_receiver_that_hangs_does_not_slow_a_note_save(
    sqlite_url: str, receivers: list[Receiver]
) -> None:
    """Saves that each write an audit row take as long with a webhook that never answers
    as with none: the message is queued, and the POST waits in another thread."""
    study, ids = make_study(sqlite_url)
    plain = app_for(sqlite_url)
    hook = receiver(receivers, ["hang"] * 100)
    hooked = app_for(sqlite_url, notify_url=hook.url)
    rounds = 12
    without = _save_times(plain, study._study_id, ids["complete"], rounds)
    with_hook = _save_times(hooked, study._study_id, ids["complete2"], rounds)
    assert len(audit_rows(sqlite_url)) == 2 * rounds
    assert hook.attempts >= 1  # the receiver was asked, and hangs
    median_without, median_with = statistics.median(without), statistics.median(with_hook)
    print(f"median note save: {median_without * 1000:.1f} ms without a webhook, "
          f"{median_with * 1000:.1f} ms with one that hangs; slowest {max(with_hook):.3f} s")
    assert max(with_hook) < notify.TIMEOUT / 5
    assert median_with < 2 * median_without + 0.02


def test_a_full_queue_drops_the_oldest_with_a_log_line_and_the_audit_keeps_every_action(
    sqlite_url: str, receivers: list[Receiver], caplog: pytest.LogCaptureFixture
) -> None:
    study, ids = make_study(sqlite_url)
    hook = receiver(receivers, ["hang"] * 100)
    # The notifier the server will take for this URL: a queue of 2.
    small = notify._notifiers[hook.url] = Notifier(hook.url, queue_size=2)
    app = app_for(sqlite_url, notify_url=hook.url)
    with caplog.at_level(logging.WARNING, "hitl_pruner"):
        _save_times(app, study._study_id, ids["complete"], 6)
    stats = small.stats()
    assert len(audit_rows(sqlite_url)) == 6
    # One message is in the hanging POST, two wait, the other three were dropped.
    assert (stats.queued, stats.dropped) == (2, 3)
    assert "is full (receiver slow or down): dropped the oldest; 1 dropped so far" in caplog.text
    assert state(sqlite_url, ids["complete"]) is TrialState.COMPLETE  # 6th save undid the 5th


def test_a_forked_child_sends_its_own_messages_only(receivers: list[Receiver]) -> None:
    """Threads do not survive fork(): the child starts its own, and drops its copy of the
    parent's queue (the parent sends those)."""
    hook = receiver(receivers, ["hang", 200, 200, 200])
    notifier = Notifier(hook.url, timeout=1.0, first_pause=0.05)
    notifier.send([entry(0), entry(1)])  # one hangs in the parent's POST, one waits
    time.sleep(0.2)
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            notifier.send([entry(7)])
            code = 0 if notifier.flush(5) and notifier.stats().sent == 1 else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert notifier.flush(10)
    numbers = sorted(b["hitl_pruner"]["trial_number"] for b in hook.bodies)
    assert numbers == [0, 1, 7]  # each once: the child did not send the parent's


@pytest.mark.parametrize("url", [
    "ftp://hooks.example.org/x", "hooks.example.org/x", "https://", "http://host:port/x",
    "file:///etc/passwd",
])
def test_a_url_that_is_not_http_or_https_is_a_config_error_at_start(url: str) -> None:
    with pytest.raises(ConfigError, match="--notify-url"):
        resolve({"notify_url": url}, environ={})
    with pytest.raises(ConfigError, match="--notify-url"):
        resolve(environ={"HITL_NOTIFY_URL": url})
    with pytest.raises(ConfigError, match="notify_url"):
        hitl_pruner.wsgi(optuna.storages.InMemoryStorage(), notify_url=url)


def test_the_url_comes_from_the_command_line_the_environment_or_the_toml_file(
    tmp_path: Path,
) -> None:
    config = tmp_path / "hitl.toml"
    config.write_text('notify_url = "https://toml.example.org/h"\n')
    env = {"HITL_CONFIG": str(config)}
    assert resolve(environ=env).notify_url == "https://toml.example.org/h"
    env["HITL_NOTIFY_URL"] = "https://env.example.org/h"
    assert resolve(environ=env).notify_url == "https://env.example.org/h"
    _, cli_settings = cli.parse(["serve", "--notify-url", "http://cli.example.org/h"])
    assert resolve(cli_settings, environ=env).notify_url == "http://cli.example.org/h"
    assert resolve(environ={}).notify_url is None
    # The webhook's path is its secret: the settings' repr leaves it out.
    assert "env.example.org" not in repr(resolve(environ=env))


def test_serve_with_a_bad_url_stops_with_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["serve", "sqlite:///never-opened.db", "--notify-url", "smtp://x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hitl-pruner: error: --notify-url: ")
    assert "http:// or https://" in err and not Path("never-opened.db").exists()


def test_the_library_api_takes_notify_url(storage_url: str, receivers: list[Receiver]) -> None:
    hook = receiver(receivers)
    study, ids = make_study(storage_url)
    app = hitl_pruner.wsgi(storage_url, notify_url=hook.url, autostart=False)
    assert save(app, study._study_id, ids["complete"], 1, "FAIL").status == 204
    [body] = hook.wait_for(1)
    assert body["hitl_pruner"]["trial_id"] == ids["complete"]
