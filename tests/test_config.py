from __future__ import annotations

from pathlib import Path

import pytest

from hitl_pruner.cli import main
from hitl_pruner.commands import DEFAULT_PRUNE_PATTERN
from hitl_pruner.config import ConfigError
from hitl_pruner.config import resolve


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_defaults_serve_the_embedded_sqlite_database() -> None:
    s = resolve({}, {})
    assert s.storage_url == "sqlite:///optuna.db"
    assert (s.host, s.port, s.interval, s.retroactive, s.dry_run) == (
        "127.0.0.1", 8080, 10.0, True, False
    )


def test_cli_beats_environment_beats_toml_beats_default(tmp_path: Path) -> None:
    toml = write(tmp_path / "c.toml", 'interval = 3\nport = 9001\nstudy = ["t"]\nverbose = true\n')
    env = {"HITL_CONFIG": toml, "HITL_INTERVAL": "4", "HITL_PORT": "9002"}
    s = resolve({"port": 9003}, env)
    assert s.port == 9003  # CLI
    assert s.interval == 4.0  # environment over file
    assert s.studies == ("t",) and s.verbose  # file over default
    assert s.prune_pattern == DEFAULT_PRUNE_PATTERN  # default


def test_from_config_flag_reads_the_file(tmp_path: Path) -> None:
    toml = write(tmp_path / "c.toml", '[hitl_pruner]\nstorage_url = "sqlite:///x.db"\n')
    assert resolve({"from_config": toml}, {}).storage_url == "sqlite:///x.db"


def test_an_unknown_toml_setting_is_an_error_listing_the_known_ones(tmp_path: Path) -> None:
    toml = write(tmp_path / "c.toml", "intervall = 3\n")
    with pytest.raises(ConfigError, match="unknown setting 'intervall'.*interval"):
        resolve({"from_config": toml}, {})


def test_environment_study_list_is_comma_separated() -> None:
    assert resolve({}, {"HITL_STUDY": "a, b,,c"}).studies == ("a", "b", "c")


def test_a_bad_boolean_in_the_environment_says_what_is_accepted() -> None:
    with pytest.raises(ConfigError, match="HITL_DRY_RUN='maybe'.*1/0, true/false"):
        resolve({}, {"HITL_DRY_RUN": "maybe"})


@pytest.mark.parametrize("flag", ["prune_pattern", "fail_pattern"])
def test_an_invalid_pattern_is_refused_at_start(flag: str) -> None:
    with pytest.raises(ConfigError, match=f"--{flag.replace('_', '-')} '\\[' is not a valid"):
        resolve({flag: "["}, {})


def test_the_password_never_shows_in_repr_or_display_url(tmp_path: Path) -> None:
    s = resolve({"db_type": "postgresql", "db_password": "s3cret"}, {})
    assert "s3cret" not in repr(s) and "s3cret" not in s.display_url
    assert s.url is not None and s.url.password == "s3cret"


def test_the_password_comes_from_a_file_or_the_environment(tmp_path: Path) -> None:
    pw = write(tmp_path / "pw", "from-file\n")
    assert resolve({"db_password_file": pw}, {}).db_password == "from-file"
    assert resolve({}, {"HITL_DB_PASSWORD": "from-env"}).db_password == "from-env"
    url = resolve({"storage_url": "postgresql://u@h/d"}, {"HITL_DB_PASSWORD": "p w"}).url
    assert url is not None and url.password == "p w"


def test_database_parts_build_the_url() -> None:
    s = resolve({"db_type": "mysql", "db_host": "db", "db_user": "me", "db_name": "opt"}, {})
    assert s.storage_url == "mysql+pymysql://me@db:3306/opt"
    assert resolve({"db_type": "sqlite", "db_name": "x"}, {}).storage_url == "sqlite:///x.db"


def test_plain_mysql_urls_use_the_driver_we_ship() -> None:
    assert resolve({"storage_url": "mysql://root@h/db"}, {}).storage_url.startswith(
        "mysql+pymysql://"
    )


def test_two_different_storage_urls_are_an_error() -> None:
    with pytest.raises(ConfigError, match="only one"):
        resolve({"storage_url": "sqlite:///a.db", "db_url": "sqlite:///b.db"}, {})


def test_active_only_turns_retroactive_changes_off() -> None:
    assert resolve({"active_only": True}, {}).retroactive is False
    assert resolve({"all_trials": True}, {}).retroactive is True


def test_use_cert_needs_an_existing_ca_file(tmp_path: Path) -> None:
    pg = {"storage_url": "postgresql://u@h/d"}
    with pytest.raises(ConfigError, match="--use-cert needs --cert-path"):
        resolve({**pg, "use_cert": True}, {})
    with pytest.raises(ConfigError, match="is not a file"):
        resolve({**pg, "use_cert": True, "cert_path": str(tmp_path / "nope.pem")}, {})
    ca = write(tmp_path / "ca.pem", "x")
    s = resolve({**pg, "use_cert": True, "no_cert": True, "cert_path": ca}, {})
    assert s.connect_args() == {"sslmode": "verify-full", "sslrootcert": ca}


def test_no_cert_disables_a_given_certificate(tmp_path: Path) -> None:
    ca = write(tmp_path / "ca.pem", "x")
    s = resolve({"storage_url": "mysql://u@h/d", "cert_path": ca, "no_cert": True}, {})
    assert s.cert_path is None and s.connect_args() == {}


def test_default_detection_picks_cert_ca_pem_for_network_databases(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cert").mkdir()
    write(tmp_path / "cert" / "ca.pem", "x")
    s = resolve({"storage_url": "mysql://u@h/d"}, {})
    assert s.connect_args()["ssl_ca"] == str(tmp_path / "cert" / "ca.pem")
    assert resolve({"storage_url": "sqlite:///x.db"}, {}).cert_path is None


def test_cli_reports_a_bad_flag_with_a_fix_and_exit_code_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["serve", "sqlite:///x.db", "--fail-pattern", "(", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "--fail-pattern '(' is not a valid regular expression" in err
    assert "Traceback" not in err


def test_cli_refuses_contradicting_scope_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--active-only", "--all-trials"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_cli_reports_an_unreachable_database_without_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["serve", "postgresql://nobody:pw@127.0.0.1:1/none", "--port", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "cannot open the storage postgresql+psycopg2://nobody:***@127.0.0.1:1/none" in err
    assert "Connection refused" in err
    assert "pw@" not in err and "Traceback" not in err


def test_gunicorn_config_files_read_the_trusted_proxies_as_the_app_does(tmp_path: Path) -> None:
    """gunicorn.conf.py's values come from resolve(): the environment, HITL_CONFIG's file, and
    networks written as gunicorn's stricter parser accepts them."""
    from hitl_pruner.gunicorn_hooks import gunicorn_settings

    assert gunicorn_settings({}) == {"forwarded_allow_ips": "127.0.0.1/32",
                                     "bind": "127.0.0.1:8080"}
    env = {"HITL_FORWARDED_ALLOW_IPS": "10.0.0.1/8, ::1", "HITL_HOST": "::1", "HITL_PORT": "81"}
    assert gunicorn_settings(env) == {"forwarded_allow_ips": "10.0.0.0/8,::1/128",
                                      "bind": "[::1]:81"}
    toml = write(tmp_path / "c.toml", 'forwarded_allow_ips = "*"\nport = 9001\n')
    assert gunicorn_settings({"HITL_CONFIG": toml}) == {"forwarded_allow_ips": "*",
                                                        "bind": "127.0.0.1:9001"}


def test_a_gunicorn_config_file_with_a_wrong_setting_trusts_nobody_and_does_not_raise() -> None:
    """An exception in gunicorn.conf.py halts gunicorn before wsgi:app can say what is wrong."""
    from hitl_pruner.gunicorn_hooks import gunicorn_settings

    for env in ({"HITL_FORWARDED_ALLOW_IPS": "proxy.example"}, {"HITL_PORT": "x"}):
        assert gunicorn_settings(env)["forwarded_allow_ips"] == ""


@pytest.mark.parametrize(
    "host, public, allowed",
    [
        ("127.0.0.1", False, True),
        ("127.0.0.2", False, True),
        ("::1", False, True),
        ("localhost", False, True),
        ("0.0.0.0", False, False),
        ("::", False, False),
        ("192.0.2.7", False, False),
        ("dashboard.example", False, False),
        ("0.0.0.0", True, True),
    ],
)
def test_serve_listens_beyond_loopback_only_with_public(
    host: str, public: bool, allowed: bool
) -> None:
    from hitl_pruner.cli import check_public

    env = {"HITL_HOST": host, "HITL_PUBLIC": "1" if public else "0"}
    settings = resolve({}, env)
    assert settings.public is public
    if allowed:
        check_public(settings)
    else:
        with pytest.raises(ConfigError, match="not a loopback address.*--public"):
            check_public(settings)


@pytest.mark.parametrize("value, public", [("true", True), ('"yes"', True), ('"false"', False),
                                           ("false", False), ("1", False)])
def test_public_in_a_toml_file_is_on_only_when_it_says_so(
    value: str, public: bool, tmp_path: Path
) -> None:
    toml = write(tmp_path / "c.toml", f"public = {value}\n")
    assert resolve({"from_config": toml}, {}).public is public
