#!/usr/bin/env bash
# Set up (if needed) and run a local swarm: a bootstrap node and 3 peers on 127.0.0.1, embedded data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python scripts/local_swarm.py "$@"
