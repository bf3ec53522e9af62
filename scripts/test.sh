#!/usr/bin/env bash
# Sets up .venv if needed, then runs the whole test suite (CPU only; about 13-15 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# Two workers: each test subprocess runs with one thread (tests/conftest.py), one per core.
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile --durations=10 tests "$@"
