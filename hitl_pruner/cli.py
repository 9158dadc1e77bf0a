"""`python -m hitl_pruner serve ...`: the dashboard with human PRUNE/FAIL, on gunicorn; and
`prune|fail|undo STORAGE_URL --study NAME --trials 3 5 7-9`: the same from a script (script.py).

Exit codes of prune, fail and undo: 0 every trial got what was asked (applied, requested of
its worker, already so, or a dry run); 1 some trial was refused or failed; 2 bad usage, an
unknown study or trial number, or a configuration error (nothing changed).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import importlib.metadata
import ipaddress
import json
import logging
import socket
import subprocess
import sys
from typing import Any
from typing import Sequence

from .config import ConfigError
from .config import Settings
from .config import resolve
from .launch import open_dashboard
from .logs import setup_logging

logger = logging.getLogger("hitl_pruner")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hitl_pruner",
        description="optuna-dashboard with human-in-the-loop PRUNE/FAIL notes.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="serve the dashboard and apply PRUNE/FAIL notes",
        description="Serve optuna-dashboard; a note saying PRUNE or FAIL ends its trial. Every "
        "option can also come from a HITL_* environment variable or --from-config FILE.toml "
        "(command line > environment > file > default).",
    )
    _add_settings_arguments(serve)
    serve.add_argument(
        "--demo", action="store_true", default=None,
        help="create a demo study with running trials and keep a demo worker going",
    )
    uninstall = sub.add_parser(
        "uninstall", help="remove hitl-pruner's tables and triggers from a database"
    )
    uninstall.add_argument("storage_url", nargs="?", metavar="STORAGE_URL")
    uninstall.add_argument("--from-config", metavar="FILE.toml")
    for name, what in (
        ("prune", "end trials as PRUNED (or relabel finished ones), as a PRUNE note would"),
        ("fail", "end trials as FAIL (or relabel finished ones), as a FAIL note would"),
        ("undo", "take PRUNE/FAIL out of trials' notes, as the Undo button does"),
    ):
        act = sub.add_parser(
            name, help=what,
            description=f"{what[0].upper()}{what[1:]}: each trial's note gets its next version "
            "and the server's own rules apply (allow-list, audit, undo, dry run). Exit code 0: "
            "every trial applied, requested or already so; 1: some trial refused or failed; "
            "2: bad usage, unknown study or trial, configuration error (nothing changed).",
        )
        _add_act_arguments(act, reason=name != "undo")
    plan = sub.add_parser(
        "plan",
        help="list the finished trials that notes written before the first start would relabel",
        description="List the finished trials whose notes, written before hitl-pruner first "
        "ran on this database, carry a command that would relabel them: on the first start "
        "serve lists and holds them, and applies them only with --apply-existing-notes. Before "
        "the first start, lists what it would hold. Reads only; changes nothing.",
    )
    plan.add_argument("storage_url", nargs="?", metavar="STORAGE_URL")
    plan.add_argument("--study", nargs="*", help="only these studies (default: all)")
    plan.add_argument("--prune-pattern", help="regex of a PRUNE command")
    plan.add_argument("--fail-pattern", help="regex of a FAIL command")
    plan.add_argument("--from-config", metavar="FILE.toml", help="read settings from a TOML file")
    _add_db_arguments(plan)
    hash_password = sub.add_parser(
        "hash-password",
        help="hash a password for --basic-auth-file",
        description="Read a password (asked twice on a terminal, else the first line of "
        "stdin) and print USER:HASH, a line for --basic-auth-file or HITL_BASIC_AUTH.",
    )
    hash_password.add_argument("user", metavar="USER")
    return parser


def _add_settings_arguments(p: argparse.ArgumentParser) -> None:
    # Defaults are None so that "not given" falls through to the environment and the file.
    p.add_argument("storage_url", nargs="?", metavar="STORAGE_URL",
                   help="e.g. sqlite:///optuna.db, postgresql://user@host/db, or a journal file")
    _add_db_arguments(p)
    mon = p.add_argument_group("Monitor configuration")
    _add_serve_arguments(p, mon)


def _add_act_arguments(p: argparse.ArgumentParser, *, reason: bool) -> None:
    p.add_argument("storage_url", nargs="?", metavar="STORAGE_URL",
                   help="e.g. sqlite:///optuna.db, postgresql://user@host/db, or a journal file")
    what = p.add_argument_group("What to change")
    what.add_argument("--study", dest="study_name", required=True, metavar="NAME",
                      help="the study's name")
    what.add_argument("--trials", nargs="+", required=True, metavar="N",
                      help="trial numbers as the dashboard shows them, or ranges like 7-9")
    if reason:
        what.add_argument("--reason", metavar="TEXT",
                          help="a line of text written into the note before the command word")
    what.add_argument("--user", metavar="NAME",
                      help="who acts: recorded in the audit, checked against --allowed-users")
    what.add_argument("--json", action="store_true", help="print the results as JSON")
    what.add_argument("--dry-run", action="store_true", default=None,
                      help="say what would change, change nothing (no note is saved)")
    _add_db_arguments(p)
    rules = p.add_argument_group("The server's rules (same settings and HITL_* as serve)")
    rules.add_argument("--allowed-users", metavar="USERS",
                       help="only these users may act, comma-separated (default: everyone)")
    rules.add_argument("--grace", type=float,
                       help="seconds a cooperative worker has to end its trial (default: 3 x "
                       "--interval)")
    rules.add_argument("--interval", type=float, help="the server's sweep interval")
    rules.add_argument("--prune-pattern", help="regex of a PRUNE command")
    rules.add_argument("--fail-pattern", help="regex of a FAIL command")
    scope = rules.add_mutually_exclusive_group()
    scope.add_argument("--all-trials", action="store_true", default=None,
                       help="also relabel COMPLETE trials (the default)")
    scope.add_argument("--active-only", action="store_true", default=None,
                       help="only end RUNNING/WAITING trials; never relabel finished ones")
    rules.add_argument("--from-config", metavar="FILE.toml", help="read settings from a TOML file")
    rules.add_argument("--verbose", action="store_true", default=None, help="debug logging")
    rules.add_argument("--notify-url", metavar="URL",
                       help="POST each change made here as JSON to this webhook (as serve does)")


def _add_db_arguments(p: argparse.ArgumentParser) -> None:
    db = p.add_argument_group("Database connection")
    db.add_argument("--db-url", help="database URL for Optuna storage (same as STORAGE_URL)")
    db.add_argument("--db-host", help="database hostname (default: localhost)")
    db.add_argument("--db-port", type=int, help="database port (default: 5432 / 3306)")
    db.add_argument("--db-name", help="database name, or SQLite file stem (default: optuna)")
    db.add_argument("--db-user", help="database username (default: optuna)")
    db.add_argument("--db-password", help="database password (prefer HITL_DB_PASSWORD or a file)")
    db.add_argument("--db-password-file", help="read the password from this file's first line")
    db.add_argument("--db-type", choices=["postgresql", "mysql", "sqlite"],
                    help="database type (default: sqlite)")
    db.add_argument("--cert-path", help="CA certificate file for TLS to the database")
    db.add_argument("--use-cert", action="store_true", default=None,
                    help="use --cert-path and verify the server (overrides --no-cert)")
    db.add_argument("--no-cert", action="store_true", default=None,
                    help="no certificate, not even ./cert/ca.pem found by default detection")


def _add_serve_arguments(p: argparse.ArgumentParser, mon: argparse._ArgumentGroup) -> None:
    mon.add_argument("--host", help="address to listen on (default: 127.0.0.1)")
    mon.add_argument("--public", action="store_true", default=None,
                     help="listen on a --host that is not loopback, without nginx in front, "
                     "although a few slow clients can then hold up the server")
    mon.add_argument("--port", type=int, help="port to listen on (default: 8080)")
    mon.add_argument("--root-path", metavar="PATH",
                     help="path prefix a reverse proxy serves us under, e.g. /optuna (default: "
                     "none, or what a proxy at --forwarded-allow-ips sends as SCRIPT_NAME or "
                     "X-Forwarded-Prefix)")
    mon.add_argument("--study", nargs="*", help="only these studies (default: all)")
    mon.add_argument("--interval", type=float, help="seconds between sweeps (default: 10)")
    mon.add_argument("--grace", type=float,
                     help="seconds a worker using HumanInTheLoopPruner has to end its trial "
                     "itself before the sweep forces the state (default: 3 x --interval)")
    mon.add_argument("--prune-pattern",
                     help="regex of a PRUNE command (default: the word PRUNE standing alone)")
    mon.add_argument("--fail-pattern",
                     help="regex of a FAIL command (default: the word FAIL standing alone)")
    mon.add_argument("--dry-run", action="store_true", default=None,
                     help="log what would change, change nothing")
    scope = mon.add_mutually_exclusive_group()
    scope.add_argument("--all-trials", action="store_true", default=None,
                       help="also relabel COMPLETE trials (the default)")
    scope.add_argument("--active-only", action="store_true", default=None,
                       help="only end RUNNING/WAITING trials; never relabel finished ones")
    mon.add_argument("--verbose", action="store_true", default=None, help="debug logging")
    mon.add_argument("--artifact-dir", help="directory of the dashboard's artifact store")
    mon.add_argument("--from-config", metavar="FILE.toml", help="read settings from a TOML file")
    mon.add_argument("--notify-url", metavar="URL",
                     help="POST every human action here as JSON, in the shape Slack's incoming "
                     "webhooks take (http or https; default: none)")
    mon.add_argument("--apply-existing-notes", action="store_true", default=None,
                     help="on the first start on a database, also relabel finished trials whose "
                     "notes already carry a command (default: list them and change nothing)")
    who = p.add_argument_group("Who may act")
    who.add_argument("--basic-auth-file", metavar="FILE",
                     help="require HTTP basic auth; FILE holds user:hash lines made by "
                     "`python -m hitl_pruner hash-password USER`")
    who.add_argument("--user-header", metavar="NAME",
                     help="take the user name from this header (e.g. X-Remote-User), sent by a "
                     "proxy at --forwarded-allow-ips")
    who.add_argument("--forwarded-allow-ips", metavar="IPS",
                     help="proxy addresses or networks trusted with X-Forwarded-* headers, a "
                     "SCRIPT_NAME header and --user-header, comma-separated, or * (default: "
                     "127.0.0.1)")
    who.add_argument("--allowed-users", metavar="USERS",
                     help="only these users' commands are applied, comma-separated; others can "
                     "still write notes (default: everyone's)")
    who.add_argument("--allowed-hosts", metavar="HOSTS",
                     help="host names this server is reached under (e.g. the name nginx "
                     "serves), comma-separated, or *; IP addresses and localhost always work")
    who.add_argument("--trusted-origins", metavar="ORIGINS",
                     help="other sites' origins allowed to change state, comma-separated, "
                     "e.g. https://tools.example.org (default: none)")
    br = p.add_argument_group("Browser launch options").add_mutually_exclusive_group()
    br.add_argument("--browser-path", help="open the dashboard in this browser executable")
    br.add_argument("--thorium-app", action="store_true", default=None,
                    help="open the dashboard in app mode (--app=URL) of the first "
                    "Chromium-family browser on PATH: Thorium, Chromium, Chrome, Brave, Edge")


SETTINGS_KEYS = (
    "storage_url db_url db_host db_port db_name db_user db_password db_password_file db_type "
    "cert_path use_cert no_cert host port study interval grace prune_pattern fail_pattern dry_run "
    "all_trials active_only verbose artifact_dir from_config browser_path basic_auth_file "
    "user_header forwarded_allow_ips allowed_users root_path public allowed_hosts trusted_origins "
    "thorium_app notify_url apply_existing_notes"
).split()


def parse(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, dict[str, Any]]:
    """The command and the settings given on the command line (None: not given)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # The command's own usage, not the top-level one: that is where the flag was meant.
        commands = next(
            a for a in parser._actions if isinstance(a, argparse._SubParsersAction)
        )
        commands.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    cli = {k: getattr(args, k, None) for k in SETTINGS_KEYS}
    urls = [t for t in getattr(args, "trials", None) or () if "://" in t]
    if urls:
        # `--trials 3 5 STORAGE_URL`: as with --study below, a URL is no trial number.
        if cli.get("storage_url") is not None or len(urls) > 1:
            parser.error(f"--trials: {urls[0]!r} is a storage URL, not a trial number")
        cli["storage_url"] = urls[0]
        args.trials = [t for t in args.trials if "://" not in t]
        if not args.trials:
            parser.error("--trials needs at least one trial number")
    studies = cli.get("study")
    if studies == []:
        parser.error("--study needs at least one study name")
    if studies:
        # `--study NAME STORAGE_URL`: --study takes several names, and a URL after them would
        # be read as one more. No study name has "://" in it; take it for the URL.
        urls = [name for name in studies if "://" in name]
        if urls:
            if cli.get("storage_url") is not None or len(urls) > 1:
                parser.error(f"--study: {urls[0]!r} is a storage URL, not a study name")
            cli["storage_url"] = urls[0]
            cli["study"] = [name for name in studies if "://" not in name] or None
            if cli["study"] is None:
                parser.error("--study needs at least one study name")
    return args, cli


def main(argv: Sequence[str] | None = None) -> int:
    args, cli = parse(argv)
    if args.command == "hash-password":
        return _hash_password(args.user)
    try:
        settings = resolve(cli)
        setup_logging(settings.verbose)
        if args.command == "uninstall":
            return _uninstall(settings)
        if args.command == "plan":
            return _plan(settings)
        if args.command in ("prune", "fail", "undo"):
            return _act(args, settings)
        return _serve(settings, demo=bool(args.demo))
    except ConfigError as exc:
        print(f"hitl-pruner: error: {exc}", file=sys.stderr)
        return 2


def _act(args: argparse.Namespace, settings: Settings) -> int:
    """prune, fail or undo: translate the command line and print one result per trial."""
    from .commands import Command
    from .script import run

    if not settings.verbose:
        # The results are the output; the applier's INFO lines would repeat them.
        logging.getLogger("hitl_pruner").setLevel(logging.WARNING)
    options = {
        field.name: getattr(settings, field.name)
        for field in dataclasses.fields(settings)
        if field.name not in ("storage_url", "dry_run")
    }
    results = run(
        settings.storage_url, args.study_name, args.trials,
        None if args.command == "undo" else Command(args.command.upper()),
        reason=getattr(args, "reason", None), user=args.user, dry_run=settings.dry_run,
        **options,
    )
    if args.json:
        print(json.dumps({
            "command": args.command, "study": args.study_name, "dry_run": settings.dry_run,
            "results": [r.to_json() for r in results],
        }))
    else:
        for result in results:
            print(result.line())
    if settings.notify_url:
        # The process ends now: a short, bounded wait for the webhook (notify.py).
        from .notify import EXIT_FLUSH
        from .notify import flush_all

        sys.stdout.flush()
        flush_all(EXIT_FLUSH)
    return 0 if all(r.ok for r in results) else 1


def _hash_password(user: str) -> int:
    import getpass

    from . import auth

    if not auth.USER_NAME.match(user):
        print(f"hitl-pruner: error: {user!r} cannot be a user name (no ':' or ',')",
              file=sys.stderr)
        return 2
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("hitl-pruner: error: the passwords differ", file=sys.stderr)
            return 2
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("hitl-pruner: error: an empty password", file=sys.stderr)
        return 2
    print(f"{user}:{auth.hash_password(password)}")
    return 0


def _uninstall(settings: Settings) -> int:
    from optuna.storages import RDBStorage

    from .app import open_storage
    from .rdb import SqlStore

    storage = open_storage(settings)
    if not isinstance(storage, RDBStorage):
        raise ConfigError("only RDB storages have hitl-pruner tables to remove")
    SqlStore(storage).uninstall()
    print(f"removed hitl-pruner's tables and triggers from {settings.display_url}")
    return 0


def _plan(settings: Settings) -> int:
    from optuna.storages import RDBStorage

    from .app import build_applier
    from .app import open_storage
    from .first_start import plan
    from .rdb import SqlStore

    storage = open_storage(settings)
    if not isinstance(storage, RDBStorage):
        raise ConfigError("only RDB storages hold notes back at the first start; a journal "
                          "cannot relabel finished trials at all")
    store = SqlStore(storage)
    kind, planned = plan(build_applier(settings, storage, store), store)
    for item in planned:
        print(item.line())
    if kind == "first start":
        print(f"hitl-pruner has not run on this database yet. Its first start will list these "
              f"{len(planned)} relabels and hold them back; with --apply-existing-notes it "
              "applies them. Running trials' commands are applied either way.")
    elif planned:
        print(f"{len(planned)} notes written before hitl-pruner first ran here are held back; "
              "start once with --apply-existing-notes (HITL_APPLY_EXISTING_NOTES=1) to apply "
              "them, or save a note again to apply that one.")
    else:
        print("no note written before hitl-pruner first ran here is held back")
    return 0


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or ``localhost``): only this machine reaches it."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: where it points may change; not loopback
        return False


def check_public(settings: Settings) -> None:
    """serve reads each request in one of 4 threads: a few clients that send half a request
    and stall hold them all. nginx in front reads each request whole first (README)."""
    if settings.public or is_loopback(settings.host):
        return
    raise ConfigError(
        f"--host {settings.host} is not a loopback address, and a few slow clients can hold "
        "up serve there: keep it on 127.0.0.1 and put nginx in front (see README, "
        "Deployment), or give --public (HITL_PUBLIC=1) to listen there anyway"
    )


def check_port_free(host: str, port: int) -> None:
    """Raise ConfigError, saying how to fix it, when another process listens on host:port."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host}: cannot resolve it ({exc.strerror})") from None
    family, kind, proto, _, address = addresses[0]
    with socket.socket(family, kind, proto) as probe:
        # As gunicorn binds: a port whose old connections linger in TIME_WAIT is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
            raise ConfigError(
                f"port {port} on {host} is in use (another server, or an earlier hitl-pruner "
                "still running): stop it, or pick another port with --port N (HITL_PORT)"
            ) from None


def _version() -> str:
    try:
        return importlib.metadata.version("hitl-pruner")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def _serve(settings: Settings, *, demo: bool) -> int:
    from gunicorn.app.base import BaseApplication

    from . import gunicorn_hooks
    from .app import create_app
    from .prefix import behind_proxy

    check_public(settings)
    # Before the database is touched: gunicorn would retry for 5 s, then stop with exit 1.
    check_port_free(settings.host, settings.port)
    demo_worker = None
    if demo:
        from . import demo as demo_module

        demo_module.seed(settings.url.render_as_string(hide_password=False)
                         if settings.url else settings.storage_url)
        demo_worker = subprocess.Popen(
            [sys.executable, "-m", "hitl_pruner.demo", settings.storage_url]
        )
    app = behind_proxy(create_app(settings), settings)
    url = f"http://{gunicorn_hooks.bind_address(settings)}/dashboard"

    def when_ready(server: Any) -> None:
        logger.info("dashboard at %s", url)
        open_dashboard(url, browser_path=settings.browser_path, app_mode=settings.thorium_app)

    options = {
        "bind": gunicorn_hooks.bind_address(settings),
        "workers": 1,
        "worker_class": "gthread",
        "threads": 4,
        "post_worker_init": gunicorn_hooks.post_worker_init,
        "pre_fork": gunicorn_hooks.pre_fork,
        "worker_exit": gunicorn_hooks.worker_exit,
        "when_ready": when_ready,
        "loglevel": "debug" if settings.verbose else "info",
        # gunicorn's own trust: X-Forwarded-Proto (https) and a SCRIPT_NAME header.
        "forwarded_allow_ips": gunicorn_hooks.trusted_proxies(settings),
    }

    class Server(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            return app

    try:
        Server().run()
    finally:
        if demo_worker is not None:
            demo_worker.terminate()
            demo_worker.wait(15)
    return 0
