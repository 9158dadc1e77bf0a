"""TLS to the database: a PostgreSQL instance of the test's own, with a certificate the test signs.

The module starts one PostgreSQL server (initdb, ``ssl = on``, only ``hostssl`` connections) on a
free loopback port, with a server certificate for ``localhost`` signed by a CA made here with the
openssl command. ``serve --use-cert --cert-path ca.pem`` must verify it (sslmode=verify-full);
another CA, or a host name the certificate does not name, must stop the server at start with
one clear line and exit code 2. Without initdb or openssl the tests skip, and fail when CI=true.
"""

from __future__ import annotations

import os
from pathlib import Path
import shutil
import subprocess
import sys
import tempfile
from typing import Iterator

from backends import as_postgres
from backends import pg_bin
from backends import unavailable
from helpers import make_study
from processes import free_port
from processes import run_to_exit
from processes import serve_server
import pytest
import sqlalchemy as sa

pytestmark = pytest.mark.e2e


def _run(cmd: list[str], cwd: Path) -> None:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} failed ({result.returncode})\n{result.stdout}\n{result.stderr}",
            pytrace=False,
        )


def _openssl(directory: Path, *args: str) -> None:
    _run(["openssl", *args], directory)


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    _openssl(directory, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", f"/CN=hitl test {name}", "-keyout", str(key), "-out", str(cert),
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return key, cert


def _make_server_cert(directory: Path, ca_key: Path, ca_cert: Path) -> tuple[Path, Path]:
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.pem"
    ext = directory / "server.ext"
    ext.write_text("subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n")
    _openssl(directory, "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
             "-keyout", str(key), "-out", str(csr))
    _openssl(directory, "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey",
             str(ca_key), "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert))
    return key, cert


class TlsPostgres:
    def __init__(self, directory: Path, port: int, ca: Path, other_ca: Path) -> None:
        self.directory = directory
        self.port = port
        self.ca = ca
        self.other_ca = other_ca

    def url(self, host: str = "localhost") -> str:
        return f"postgresql+psycopg2://postgres@{host}:{self.port}/postgres"

    def client_url(self) -> str:
        """For the test's own connections: verified the same way the server's are."""
        return f"{self.url()}?sslmode=verify-full&sslrootcert={self.ca}"


@pytest.fixture(scope="module")
def tls_postgres() -> Iterator[TlsPostgres]:
    initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        unavailable("PostgreSQL's initdb and pg_ctl")
    if shutil.which("openssl") is None:
        unavailable("the openssl command")
    assert initdb is not None and pg_ctl is not None
    directory = Path(tempfile.mkdtemp(prefix="hitl-tls-"))
    data = directory / "data"
    started = False
    try:
        ca_key, ca = _make_ca(directory, "ca")
        _, other_ca = _make_ca(directory, "other-ca")
        key, cert = _make_server_cert(directory, ca_key, ca)
        if os.geteuid() == 0:
            shutil.chown(directory, "postgres")
            for path in (key, cert):
                shutil.chown(path, "postgres")
        directory.chmod(0o755)
        key.chmod(0o600)  # PostgreSQL refuses a key others can read
        for path in (ca, other_ca):
            path.chmod(0o644)
        _run(as_postgres([initdb, "-D", str(data), "-U", "postgres", "--auth=trust"]), directory)
        port = free_port()
        with open(data / "postgresql.conf", "a") as conf:
            conf.write(
                f"\nport = {port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{directory}'\n"
                f"ssl = on\nssl_cert_file = '{cert}'\nssl_key_file = '{key}'\n"
            )
        # TLS or nothing over TCP: a test that passes must have verified the certificate.
        (data / "pg_hba.conf").write_text(
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\n"
        )
        _run(as_postgres([pg_ctl, "-D", str(data), "-l", str(directory / "postgres.log"),
                           "-w", "-t", "60", "start"]), directory)
        started = True
        yield TlsPostgres(directory, port, ca, other_ca)
    finally:
        if started:
            subprocess.run(as_postgres([pg_ctl, "-D", str(data), "-m", "immediate", "stop"]),
                           cwd=directory, capture_output=True, timeout=60)
        shutil.rmtree(directory, ignore_errors=True)


def test_serves_over_verified_tls_and_applies_a_note(
    tls_postgres: TlsPostgres, tmp_path: Path
) -> None:
    """--use-cert --cert-path CA: the server verifies the database's certificate and works."""
    client = sa.create_engine(tls_postgres.client_url())
    try:
        with client.connect() as conn:
            assert conn.exec_driver_sql("SHOW ssl").scalar() == "on"
    finally:
        client.dispose()
    study, ids = make_study(tls_postgres.client_url(), name="tls")
    args = ["--use-cert", "--cert-path", str(tls_postgres.ca)]
    with serve_server(tls_postgres.url(), tmp_path, args=args) as server:
        reply = server.put_note(study._study_id, ids["running"], 1, "diverged: PRUNE")
        assert reply.status == 204, reply
        assert reply.outcome is not None and reply.outcome["action"] == "applied", reply
        assert server.trial_states(study._study_id)[ids["running"]] == "Pruned"
    engine = sa.create_engine(tls_postgres.client_url())
    try:
        with engine.connect() as conn:
            ssl_rows = conn.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_ssl WHERE ssl"
            ).scalar()
        assert ssl_rows and ssl_rows >= 1
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "case", ["wrong-ca", "wrong-host"],
)
def test_unverifiable_certificate_stops_the_server_with_one_line(
    tls_postgres: TlsPostgres, tmp_path: Path, case: str
) -> None:
    """Another CA, or a host name the certificate does not name: exit 2, a clear line, no
    traceback."""
    if case == "wrong-ca":
        url, ca = tls_postgres.url(), tls_postgres.other_ca
        expected = ["certificate verify failed", "is --cert-path the CA that signed"]
    else:
        url, ca = tls_postgres.url("127.0.0.1"), tls_postgres.ca
        expected = ["does not match host", "a host name the certificate names"]
    result = run_to_exit(
        [sys.executable, "-m", "hitl_pruner", "serve", url, "--port", str(free_port()),
         "--use-cert", "--cert-path", str(ca)],
        cwd=tmp_path, timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert result.stderr.startswith("hitl-pruner: error: cannot open the storage"), output
    for text in expected:
        assert text in result.stderr, output
    assert "Traceback" not in output
    # One line: the message, not a driver's multi-line dump.
    assert len(result.stderr.strip().splitlines()) == 1, output
