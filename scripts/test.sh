#!/usr/bin/env bash
# Set up (if needed), lint, and run the whole test suite: unit tests, then real swarms on 127.0.0.1.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m 'not integration'` for the unit tests only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
ruff format --check .
python -m pytest -q --durations=10 "$@"
