#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: unit tests, then real swarms on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
python -m pytest -q "$@"
