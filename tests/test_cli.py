"""The first minutes with `python -m hitl_pruner`: what a mistyped command line says, and the
seed tool's flags that its launch scripts pass."""

from __future__ import annotations

import os
from pathlib import Path
import socket
import stat
import time

import pytest

from hitl_pruner.cli import check_port_free
from hitl_pruner.cli import main
from hitl_pruner.cli import parse
from hitl_pruner.config import ConfigError
from hitl_pruner.config import resolve
from hitl_pruner.launch import open_dashboard


def test_version_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("python -m hitl_pruner ") and "0." in out


def test_a_mistyped_flag_shows_the_commands_own_usage(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Regression: `serve --prot 9000` printed the top-level usage, which lists no flags."""
    with pytest.raises(SystemExit) as exited:
        main(["serve", "sqlite:///x.db", "--prot", "9000"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "usage: python -m hitl_pruner serve" in err
    assert "unrecognized arguments: --prot 9000" in err


@pytest.mark.parametrize("argv, url, studies", [
    (["serve", "--study", "hitl-demo", "sqlite:///m.db"], "sqlite:///m.db", ["hitl-demo"]),
    (["serve", "--study", "a", "b", "postgresql://u@h/db"], "postgresql+psycopg2://u@h/db",
     ["a", "b"]),
    (["serve", "sqlite:///m.db", "--study", "a", "b"], "sqlite:///m.db", ["a", "b"]),
], ids=["url after one study", "url after two studies", "url first"])
def test_a_storage_url_after_study_names_is_the_storage_url(
    argv: list[str], url: str, studies: list[str]
) -> None:
    """Regression: `serve --study hitl-demo sqlite:///m.db` took the URL for a second study
    name and served a new, empty optuna.db."""
    _, cli = parse(argv)
    settings = resolve(cli, {})
    assert (settings.storage_url, list(settings.studies)) == (url, studies)


@pytest.mark.parametrize("argv", [
    ["serve", "sqlite:///a.db", "--study", "s", "sqlite:///b.db"],
    ["serve", "--study", "sqlite:///b.db"],
], ids=["two urls", "no study name left"])
def test_a_url_among_study_names_that_cannot_be_the_url_is_an_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse(argv)
    assert exited.value.code == 2
    assert "--study" in capsys.readouterr().err


def test_a_port_in_use_is_one_line_before_the_database_is_touched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: gunicorn retried for 5 s, printed `Can't connect`, and exited 1 after the
    database had been set up."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        db = tmp_path / "never.db"
        started = time.monotonic()
        code = main(["serve", f"sqlite:///{db}", "--port", str(port)])
        took = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 2
    assert f"port {port} on 127.0.0.1 is in use" in err and "--port N" in err
    assert err.count("\n") == 1
    assert not db.exists()
    assert took < 5  # not gunicorn's five retries


def test_a_free_port_passes_the_check() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    check_port_free("127.0.0.1", port)
    with pytest.raises(ConfigError, match="cannot resolve"):
        check_port_free("no-such-host.invalid", port)


def fake_browser(directory: Path, name: str) -> Path:
    """An executable that writes its arguments to a file, in place of a browser."""
    out = directory / f"{name}.args"
    script = directory / name
    script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{out}"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return out


def test_thorium_app_opens_the_first_chromium_family_browser_in_app_mode(tmp_path: Path) -> None:
    """The seed tool's launch scripts pass --thorium-app; they run unchanged."""
    fake_browser(tmp_path, "chromium")
    out = fake_browser(tmp_path, "thorium-browser")
    process = open_dashboard("http://127.0.0.1:8080/dashboard", app_mode=True,
                             path=str(tmp_path))
    assert process is not None and process.wait(10) == 0
    assert out.read_text().splitlines() == ["--app=http://127.0.0.1:8080/dashboard"]


def test_thorium_app_without_a_browser_says_so_and_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert open_dashboard("http://x/dashboard", app_mode=True, path=str(tmp_path)) is None
    assert "no Chromium-family browser on PATH" in caplog.text


def test_thorium_app_is_a_setting_and_excludes_browser_path(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, cli = parse(["serve", "--thorium-app"])
    assert resolve(cli, {}).thorium_app
    assert resolve({}, {"HITL_THORIUM_APP": "1"}).thorium_app
    with pytest.raises(SystemExit):
        parse(["serve", "--thorium-app", "--browser-path", "/usr/bin/firefox"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_browser_path_opens_that_browser_on_the_dashboard(tmp_path: Path) -> None:
    out = fake_browser(tmp_path, "mybrowser")
    process = open_dashboard("http://127.0.0.1:8080/dashboard",
                             browser_path=str(tmp_path / "mybrowser"))
    assert process is not None and process.wait(10) == 0
    assert out.read_text().splitlines() == ["http://127.0.0.1:8080/dashboard"]
    assert os.access(tmp_path / "mybrowser", os.X_OK)
