"""Behind nginx, at the root and under /optuna/: the files in scripts/, run as written.

gunicorn runs with the ``ExecStart`` arguments and ``Environment`` lines of
scripts/systemd/hitl-pruner.service (so with scripts/gunicorn.conf.py); nginx (Debian's, started
here on a free port as this test's own process) runs scripts/nginx/hitl-pruner.conf with its
placeholders filled in. Without nginx or Chromium these tests skip locally and fail when
CI=true.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
import shlex
import shutil
import signal
import subprocess
import time
from typing import Any
from typing import Callable
from typing import Iterator

from backends import unavailable
import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.artifacts import upload_artifact
from optuna.storages import RDBStorage
from optuna.trial import TrialState
from processes import HOST
from processes import REPO_ROOT
from processes import Reply
from processes import Server
from processes import free_port
from processes import gunicorn_server
from processes import serve_server
import pytest
import requests
from test_browser import SHOWN_STATE
from test_browser import STUDY
from test_browser import Pages
from test_browser import browser  # noqa: F401  (a fixture)
from test_browser import open_trial
from test_browser import pages  # noqa: F401  (a fixture)
from test_browser import wait_shown

pytestmark = pytest.mark.e2e

SCRIPTS = REPO_ROOT / "scripts"
SITE = SCRIPTS / "nginx" / "hitl-pruner.conf"
PROXY_CONF = SCRIPTS / "nginx" / "hitl-pruner-proxy.conf"
UNIT = SCRIPTS / "systemd" / "hitl-pruner.service"
PREFIX = "/optuna"
# A 1x1 PNG, for an image artifact shown in a card and in a note.
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
    "0000000d49444154789c6360f8cfc0f01f0005000201a5d6a0e70000000049454e44ae426082"
)


def nginx_binary() -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx",) if Path(p).is_file()), None
    )
    if found is None:
        unavailable("nginx (apt-get install nginx)")
    assert found is not None
    return found


def unit_command() -> tuple[list[str], dict[str, str]]:
    """gunicorn's arguments and the HITL_ settings of the systemd unit, as written."""
    args: list[str] = []
    env: dict[str, str] = {}
    for line in UNIT.read_text().splitlines():
        if line.startswith("ExecStart="):
            words = shlex.split(line.removeprefix("ExecStart="))
            assert words[1:3] == ["-m", "gunicorn"] and words[-1] == "wsgi:app", words
            args = words[3:-1]
        elif line.startswith("Environment=HITL_"):
            key, _, value = line.removeprefix("Environment=").partition("=")
            env[key] = value
    assert args, f"no ExecStart in {UNIT}"
    # processes.gunicorn_server sets the address itself.
    env.pop("HITL_HOST", None)
    env.pop("HITL_PORT", None)
    return args, env


class Nginx:
    def __init__(self, port: int) -> None:
        self.port = port
        self.base = f"http://{HOST}:{port}"

    def request(self, method: str, path: str, **kwargs: Any) -> Reply:
        kwargs.setdefault("timeout", 30)
        kwargs.setdefault("allow_redirects", False)
        with requests.request(method, self.base + path, **kwargs) as response:
            return Reply(response)

    def get(self, path: str, **kwargs: Any) -> Reply:
        return self.request("GET", path, **kwargs)


def _answers_meta(proxy: Nginx) -> bool:
    try:
        return proxy.get("/api/meta").status == 200
    except requests.RequestException:
        return False


@contextlib.contextmanager
def nginx(upstream: Server, tmp_path: Path,
          ready: Callable[[Nginx], bool] = _answers_meta) -> Iterator[Nginx]:
    """nginx in the foreground with scripts/nginx/hitl-pruner.conf in front of ``upstream``;
    yielded once ``ready(proxy)`` (by default: ``GET /api/meta`` answers 200 through it)."""
    binary = nginx_binary()
    root = tmp_path / "nginx"
    conf = root / "conf"
    conf.mkdir(parents=True)
    shutil.copy(PROXY_CONF, conf / PROXY_CONF.name)
    temp = "\n".join(
        f"    {kind}_temp_path {root / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # The stand-in for Debian's /etc/nginx/nginx.conf, which includes the site in http {}.
    (conf / "nginx.conf").write_text(
        ("user root;\n" if os.geteuid() == 0 else "")
        + f"error_log {root / 'error.log'} info;\n"
        "events { worker_connections 256; }\n"
        "http {\n"
        f"    access_log {root / 'access.log'};\n"
        f"{temp}\n"
        f"    include {SITE.name};\n"
        "}\n"
    )
    log = open(root / "stdout.log", "wb")
    proc: subprocess.Popen[bytes] | None = None

    def describe() -> str:
        parts = [f"nginx returncode {proc and proc.poll()}"]
        for name in ("stdout.log", "error.log"):
            with contextlib.suppress(FileNotFoundError):
                parts.append(f"--- {name} ---\n{(root / name).read_text()[-4000:]}")
        return "\n".join(parts)

    def start(port: int) -> subprocess.Popen[bytes]:
        site = SITE.read_text()
        for placeholder, value in {
            "@UPSTREAM@": f"{HOST}:{upstream.port}",
            "@LISTEN@": f"{HOST}:{port}",
            "@NAME@": "localhost",
        }.items():
            assert placeholder in site
            site = site.replace(placeholder, value)
        (conf / SITE.name).write_text(site)
        return subprocess.Popen(
            [binary, "-c", str(conf / "nginx.conf"), "-p", str(root),
             "-g", f"daemon off; pid {root / 'nginx.pid'};"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def said(text: str) -> int:
        """How often nginx has logged ``text`` so far."""
        with contextlib.suppress(FileNotFoundError):
            return (root / "error.log").read_text().count(text)
        return 0

    # Another test's server can take the port between free_port() and nginx's bind: nginx then
    # starts again on another port. Until nginx says it has bound its port, an answer on that
    # port may come from that other server: no request before.
    try:
        for attempt in range(3):
            taken, bound = said("Address already in use"), said("start worker processes")
            port = free_port()
            proc = start(port)
            proxy = Nginx(port)
            deadline = time.monotonic() + 15
            while proc.poll() is None:
                if said("start worker processes") > bound and ready(proxy):
                    break
                if time.monotonic() > deadline:
                    pytest.fail(f"nginx did not answer\n{describe()}", pytrace=False)
                time.sleep(0.1)
            if proc.poll() is None:
                break
            if said("Address already in use") == taken or attempt == 2:
                pytest.fail(f"nginx stopped\n{describe()}", pytrace=False)
        yield proxy
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)  # nginx's graceful stop
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        log.close()


@contextlib.contextmanager
def deployed(url: str, tmp_path: Path, env: dict[str, str] | None = None) -> Iterator[Nginx]:
    args, unit_env = unit_command()
    with gunicorn_server(url, tmp_path, args=args, env={**unit_env, **(env or {})}) as server:
        with nginx(server, tmp_path) as proxy:
            yield proxy


def seed(url: str, artifacts: Path | None = None) -> tuple[int, list[int], str | None]:
    """Trials 0 and 1 COMPLETE (trial 0 with an image artifact), 2 and 3 RUNNING."""
    study = optuna.create_study(study_name=STUDY, storage=RDBStorage(url))
    ids = []
    artifact_id = None
    for number in range(4):
        trial = study.ask()
        trial.report(trial.suggest_float("x", 0, 1), 0)
        if artifacts is not None and number == 0:
            image = artifacts.parent / "dot.png"
            image.write_bytes(PNG)
            artifact_id = upload_artifact(
                artifact_store=FileSystemArtifactStore(str(artifacts)), file_path=str(image),
                study_or_trial=trial,
            )
        if number < 2:
            study.tell(trial, 0.5)
        ids.append(trial._trial_id)
    return study._study_id, ids, artifact_id


def put_note(proxy: Nginx, prefix: str, sid: int, tid: int, version: int, body: str) -> Reply:
    return proxy.request(
        "PUT", f"{prefix}/api/studies/{sid}/{tid}/note", json={"version": version, "body": body}
    )


@pytest.mark.parametrize("prefix", ["", PREFIX], ids=["root", "prefix"])
def test_dashboard_api_notes_and_actions_through_nginx(
    prefix: str, sqlite_url: str, tmp_path: Path
) -> None:
    sid, ids, _ = seed(sqlite_url)
    with deployed(sqlite_url, tmp_path) as proxy:
        page = proxy.get(f"{prefix}/dashboard/studies/{sid}/trials")
        assert page.status == 200
        assert f'src="{prefix}/static/bundle.js"' in page.text
        assert f'src="{prefix}/hitl/static/hitl.js"' in page.text
        bundle = proxy.get(f"{prefix}/static/bundle.js")
        assert bundle.status == 200
        assert f'url_prefix:"{prefix}/dashboard"'.encode() in bundle.content
        assert proxy.get(f"{prefix}/hitl/static/hitl.js").status == 200

        studies = proxy.get(f"{prefix}/api/studies")
        assert studies.status == 200
        assert [s["study_name"] for s in studies.json["study_summaries"]] == [STUDY]

        saved = put_note(proxy, prefix, sid, ids[2], 1, "too slow\nPRUNE")
        assert saved.status == 204, saved
        assert saved.outcome is not None and saved.outcome["action"] == "applied"
        assert RDBStorage(sqlite_url).get_trial(ids[2]).state is TrialState.PRUNED

        actions = proxy.get(f"{prefix}/hitl/api/actions")
        assert actions.status == 200
        assert [(a["trial_id"], a["to"]) for a in actions.json["actions"]] == [(ids[2], "PRUNED")]
        view = proxy.get(f"{prefix}/hitl/actions")
        assert view.status == 200 and 'src="static/hitl.js"' in view.text
        assert proxy.get(f"{prefix}/csv/{sid}").status == 200
        trials = proxy.get(f"{prefix}/api/studies/{sid}").json["trials"]
        assert {t["trial_id"]: t["state"] for t in trials}[ids[2]] == "Pruned"

        # The redirects keep the prefix and the address the browser used.
        start = proxy.get(f"{prefix}/")
        assert start.status == 302
        assert start.headers["Location"] in (f"{prefix}/dashboard", f"{proxy.base}/dashboard")
        if prefix:
            assert proxy.get(prefix).headers["Location"].endswith(f"{prefix}/")


def test_forwarded_headers_count_only_from_trusted_addresses(
    sqlite_url: str, tmp_path: Path
) -> None:
    """X-Forwarded-Prefix, -Host, -Proto and a SCRIPT_NAME header from an address outside
    --forwarded-allow-ips change nothing; the same headers from a trusted one do."""
    args, env = unit_command()
    spoof = {
        "X-Forwarded-Prefix": "/evil",
        "X-Forwarded-Host": "evil.example",
        "X-Forwarded-Proto": "https",
    }
    untrusted = {**env, "HITL_FORWARDED_ALLOW_IPS": "192.0.2.1"}
    with gunicorn_server(sqlite_url, tmp_path, args=args, env=untrusted) as server:
        page = server.get("/dashboard", headers=spoof)
        assert page.status == 200
        assert 'src="/static/bundle.js"' in page.text and "/evil" not in page.text
        start = server.get("/", headers=spoof)
        assert start.headers["Location"] == f"http://{HOST}:{server.port}/dashboard"
        # gunicorn drops a SCRIPT_NAME header from an untrusted peer.
        named = server.get("/dashboard", headers={"SCRIPT_NAME": "/evil"})
        assert named.status == 200 and "/evil" not in named.text

    with gunicorn_server(sqlite_url, tmp_path, args=args, env=env) as server:
        page = server.get("/dashboard", headers=spoof)
        assert 'src="/evil/static/bundle.js"' in page.text
        start = server.get("/", headers=spoof)
        assert start.headers["Location"] == "/evil/dashboard"
        start = server.get("/", headers={"X-Forwarded-Host": "proxy.example",
                                         "X-Forwarded-Proto": "https"})
        assert start.headers["Location"] == "https://proxy.example/dashboard"
        # gunicorn's own way: a SCRIPT_NAME header, and the whole path.
        named = server.get("/optuna/dashboard", headers={"SCRIPT_NAME": "/optuna"})
        assert named.status == 200 and 'src="/optuna/static/bundle.js"' in named.text
        studies = server.get("/optuna/api/studies", headers={"SCRIPT_NAME": "/optuna"})
        assert studies.status == 200


def test_serve_with_a_root_path_behind_nginx(sqlite_url: str, tmp_path: Path) -> None:
    """``serve --root-path /optuna``: the prefix without any header, for a proxy that sends none."""
    sid, ids, _ = seed(sqlite_url)
    with serve_server(sqlite_url, tmp_path, args=["--root-path", PREFIX]) as server:
        page = server.get(f"{PREFIX}/dashboard")
        assert page.status == 200 and f'src="{PREFIX}/static/bundle.js"' in page.text
        with nginx(server, tmp_path) as proxy:
            page = proxy.get(f"{PREFIX}/dashboard/studies/{sid}")
            assert page.status == 200 and f'src="{PREFIX}/hitl/static/hitl.js"' in page.text
            saved = put_note(proxy, PREFIX, sid, ids[3], 1, "FAIL")
            assert saved.status == 204 and saved.outcome is not None
            assert saved.outcome["action"] == "applied"


def test_prune_in_chromium_under_a_prefix(
    sqlite_url: str, pages: Pages, tmp_path: Path  # noqa: F811
) -> None:
    """The whole UI under /optuna/ through nginx: no request leaves the prefix."""
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    sid, ids, artifact_id = seed(sqlite_url, artifacts)
    env = {"HITL_ARTIFACT_DIR": str(artifacts)}
    with deployed(sqlite_url, tmp_path, env) as proxy:
        image = f"/artifacts/{sid}/{ids[0]}/{artifact_id}"
        assert put_note(proxy, PREFIX, sid, ids[0], 1, f"a dot: ![dot]({image})").status == 204

        page, _ = pages.open()
        requested: list[str] = []
        page.on("request", lambda request: requested.append(request.url))
        page.goto(f"{proxy.base}{PREFIX}/")
        page.get_by_text(f"1. {STUDY}", exact=True).click()
        page.wait_for_url(f"**{PREFIX}/dashboard/studies/{sid}")
        page.locator(".js-plotly-plot").first.wait_for()
        page.goto(f"{proxy.base}{PREFIX}/dashboard/studies/{sid}/trials")

        # Trial 0: its artifact card and the image in its note load from under the prefix.
        open_trial(page, 0, ids[0])
        page.get_by_text("dot.png").first.wait_for()
        page.wait_for_function(
            """(src) => {
                const imgs = [...document.querySelectorAll("img")]
                    .filter((i) => i.getAttribute("src") === src);
                return imgs.length >= 2 && imgs.every((i) => i.complete && i.naturalWidth === 1);
            }""",
            arg=PREFIX + image,
        )

        open_trial(page, 2, ids[2])
        page.locator(".hitl-bar button[data-command=PRUNE]").click()
        wait_shown(page, SHOWN_STATE, f"Trial 2 (trial_id={ids[2]})", "Pruned", 2)
        assert RDBStorage(sqlite_url).get_trial(ids[2]).state is TrialState.PRUNED

        # The CSV download of the trial table.
        page.goto(f"{proxy.base}{PREFIX}/dashboard/studies/{sid}/smartSelection")
        csv = page.locator("a[download]", has_text="CSV").first
        csv.wait_for()
        href = csv.get_attribute("href")
        assert href is not None and href.startswith(f"{PREFIX}/csv/{sid}"), href
        download = page.request.get(proxy.base + href)
        assert download.status == 200 and "Number" in download.text()

        page.goto(f"{proxy.base}{PREFIX}/dashboard/studies/{sid}/trials")
        open_trial(page, 3, ids[3])
        page.locator(".hitl-bar a", has_text="Human actions").click()
        page.wait_for_url(f"**{PREFIX}/hitl/actions?study={sid}")
        rows = page.locator("#hitl-actions tr")
        rows.first.wait_for()
        # Back to the study, under the prefix.
        back = page.locator("#hitl-dashboard-link").get_attribute("href")
        assert back == f"{PREFIX}/dashboard/studies/{sid}", back
        assert "RUNNING \u2192 PRUNED" in rows.first.inner_text()
        rows.first.locator("a", has_text="Trial 2").click()
        page.wait_for_url(f"**{PREFIX}/dashboard/studies/{sid}/trials**")
        wait_shown(page, SHOWN_STATE, f"Trial 2 (trial_id={ids[2]})", "Pruned", 5)
        pages.finish()

    inside = f"{proxy.base}{PREFIX}/"
    escaped = [u for u in requested if not u.startswith(inside) and not u.startswith("data:")]
    assert escaped == [], "requests outside the prefix:\n" + "\n".join(escaped)
    assert any(u.startswith(f"{inside}api/studies/{sid}") for u in requested)
    assert any(u.startswith(f"{inside}artifacts/") for u in requested)


def test_the_systemd_unit_is_valid(tmp_path: Path) -> None:
    """systemd-analyze finds nothing wrong in the unit but the venv this machine lacks."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        unavailable("systemd-analyze (apt-get install systemd)")
    assert analyze is not None
    unit = tmp_path / UNIT.name
    shutil.copy(UNIT, unit)
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                            timeout=60)
    complaints = [
        line for line in (result.stdout + result.stderr).splitlines()
        if line.strip() and "/opt/hitl-pruner/.venv/bin/python is not executable" not in line
    ]
    assert complaints == []
