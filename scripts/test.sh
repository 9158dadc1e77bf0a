#!/usr/bin/env bash
# Installs what the test suite needs and runs it: `bash scripts/test.sh [pytest args]`.
# Needs PostgreSQL (127.0.0.1:5432, user postgres) and MariaDB/MySQL (127.0.0.1:3306, root)
# reachable; with CI=true a missing one fails the run instead of skipping its tests.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# Debian's Chromium and nginx for the browser and proxy tests; a Playwright browser download
# does not work everywhere, so the tests drive /usr/bin/chromium.
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
if [ ${#missing[@]} -gt 0 ]; then
  as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq "${missing[@]}" >/dev/null || echo "could not install ${missing[*]}" >&2
fi

# Start the local database servers if they are installed but stopped.
if command -v pg_isready >/dev/null 2>&1 && ! pg_isready -q -h 127.0.0.1; then
  as_root pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start \
    || true
fi
if command -v mariadbd >/dev/null 2>&1 && ! mysqladmin -h 127.0.0.1 -uroot status >/dev/null 2>&1; then
  as_root start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd || true
  for _ in $(seq 30); do mysqladmin -h 127.0.0.1 -uroot status >/dev/null 2>&1 && break; sleep 1; done
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'

# The throwaway SQLite files, logs and server runtime dirs on a memory file system when there is
# one: the same SQLite, minus an fsync per commit (several ms each on a busy disk).
if [ -z "${TMPDIR:-}" ] && [ -d /dev/shm ] && [ -w /dev/shm ]; then
  export TMPDIR=/dev/shm
fi
# In parallel (pytest-xdist): most tests wait on server processes and databases, not on a CPU,
# so more workers than cores pay (HITL_TEST_WORKERS). loadgroup keeps the Chromium tests in one
# worker (tests/conftest.py). Arguments given to this script come after and win, e.g.
# `bash scripts/test.sh -n0 tests/test_lock.py` runs serially; plain `pytest` stays serial.
exec .venv/bin/python -m pytest -n "${HITL_TEST_WORKERS:-4}" --dist loadgroup "$@"
