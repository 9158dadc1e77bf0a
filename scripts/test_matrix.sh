#!/usr/bin/env bash
# Runs the core, worker and browser tests on the other ends of the supported range, and the
# parts that changed inside it on the releases that changed them:
# `bash scripts/test_matrix.sh [pytest args]`. scripts/test.sh runs the whole suite on the newest
# releases (what pip picks); run it first, it starts the databases and installs Chromium/nginx.
# Each combination gets its own venv, .venv-matrix/<combo>, built once and reused until
# pyproject.toml changes. Fails when any test of any combination fails.
set -euo pipefail
cd "$(dirname "$0")/.."

# "optuna optuna-dashboard TESTS": exact releases, and the list below that they run.
# - The oldest Optuna we support with the oldest dashboard (0.19 accepts optuna>=3.1; 0.20 and
#   0.21 accept optuna>=3.6): everything that touches the versions.
# - The first Optuna with a gRPC storage proxy (4.2; 4.0 has none, so the proxy cases skip
#   above), with the newest dashboard: the workers behind the proxy.
# - The middle dashboard (0.20: a page policy and LLM providers as 0.21, the axios bundle of
#   0.19, Smart Selection) on the newest Optuna: what the dashboard's release decides.
COMBOS=(
  "4.0.0 0.19.0 RANGE_TESTS"
  "4.2.0 0.21.0 PROXY_TESTS"
  "5.0.0 0.20.0 DASHBOARD_TESTS"
)
# What touches the versions: the dashboard's internals, the worker side on Optuna's API, the
# note-save path, the library API (the dashboard's storage opening, its LLM option), the
# served page and bundle (also under a sub-path), hitl.js in Chromium, and real processes.
RANGE_TESTS=(
  tests/test_dashboard_internals.py
  tests/test_worker.py
  tests/test_worker_processes.py
  tests/test_cooperation.py
  tests/test_journal_cooperation.py
  tests/test_e2e.py
  tests/test_browser.py
  tests/test_browser_live.py
  tests/test_browser_attacks.py
  tests/test_prefix.py
  tests/test_middleware.py
  tests/test_note_save.py
  tests/test_library_api.py
  tests/test_ui.py
)
# Workers behind GrpcStorageProxy: in process on each RDB backend, and as real processes.
PROXY_TESTS=(
  tests/test_grpc_proxy.py
  tests/test_journal_cooperation.py
)
# What the dashboard's release decides, none of Optuna's worker side: its internals (note keys,
# trial cache, bundle strings), the note-save path, the bundle under a sub-path, the page and its
# policy, the LLM option, and hitl.js in Chromium on its bundle and pages.
DASHBOARD_TESTS=(
  tests/test_dashboard_internals.py
  tests/test_note_save.py
  tests/test_prefix.py
  tests/test_ui.py
  tests/test_library_api.py
  tests/test_browser.py
)

if [ -z "${TMPDIR:-}" ] && [ -d /dev/shm ] && [ -w /dev/shm ]; then
  export TMPDIR=/dev/shm
fi

failed=()
for combo in "${COMBOS[@]}"; do
  read -r optuna dashboard list <<<"$combo"
  declare -n tests="$list"
  venv=".venv-matrix/optuna-$optuna-dashboard-$dashboard"
  if [ ! -f "$venv/.installed" ] || [ pyproject.toml -nt "$venv/.installed" ]; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q -e '.[test]' \
      "optuna==$optuna" "optuna-dashboard==$dashboard"
    touch "$venv/.installed"
  fi
  # The venv must hold exactly these releases, or this run proves nothing about them.
  "$venv/bin/python" - "$optuna" "$dashboard" <<'EOF'
import sys

import optuna
import optuna_dashboard

found = (optuna.__version__, optuna_dashboard.__version__)
if found != tuple(sys.argv[1:]):
    sys.exit(f"expected optuna, optuna-dashboard {sys.argv[1:]}, found {found}")
EOF
  echo "== optuna $optuna, optuna-dashboard $dashboard"
  # As scripts/test.sh: in parallel, the Chromium tests kept in one worker (loadgroup).
  if ! "$venv/bin/python" -m pytest -n "${HITL_TEST_WORKERS:-4}" --dist loadgroup \
      "${tests[@]}" "$@"; then
    failed+=("optuna $optuna, optuna-dashboard $dashboard")
  fi
  unset -n tests
done

if [ ${#failed[@]} -gt 0 ]; then
  printf 'failed on: %s\n' "${failed[@]}" >&2
  exit 1
fi
