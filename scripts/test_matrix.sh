#!/usr/bin/env bash
# Runs the core, worker and browser tests on the other ends of the supported range:
# `bash scripts/test_matrix.sh [pytest args]`. scripts/test.sh runs the whole suite on the newest
# releases (what pip picks); run it first, it starts the databases and installs Chromium/nginx.
# Each combination gets its own venv, .venv-matrix/<combo>, built once and reused until
# pyproject.toml changes. Fails when any test of any combination fails.
set -euo pipefail
cd "$(dirname "$0")/.."

# "optuna optuna-dashboard", exact releases. The oldest Optuna we support, with the oldest
# dashboard we support (0.19 accepts optuna>=3.1; 0.20 and 0.21 accept optuna>=3.6).
COMBOS=(
  "4.0.0 0.19.0"
)
# What touches the versions: the dashboard's internals, the worker side on Optuna's API, the
# note-save path, the library API (the dashboard's storage opening, its LLM option), the
# served page and bundle (also under a sub-path), hitl.js in Chromium, and real processes.
TESTS=(
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

if [ -z "${TMPDIR:-}" ] && [ -d /dev/shm ] && [ -w /dev/shm ]; then
  export TMPDIR=/dev/shm
fi

failed=()
for combo in "${COMBOS[@]}"; do
  read -r optuna dashboard <<<"$combo"
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
      "${TESTS[@]}" "$@"; then
    failed+=("optuna $optuna, optuna-dashboard $dashboard")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  printf 'failed on: %s\n' "${failed[@]}" >&2
  exit 1
fi
