#!/usr/bin/env bash
# Create .venv and install the project with its test tools. CPU machines get the CPU build of torch
# (torch==2.13.0 on Linux x86_64, small and fast to install); machines with an NVIDIA driver keep pip's
# default (CUDA) build. Set TORCH_SPEC to choose another torch, e.g. TORCH_SPEC="torch==2.5.1".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
if [ -n "${TORCH_SPEC:-}" ]; then
  python -m pip install --quiet "$TORCH_SPEC"
elif ! command -v nvidia-smi >/dev/null 2>&1 && ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install --quiet "torch==2.13.0" || python -m pip install --quiet torch
fi
python -m pip install --quiet -e ".[dev]"
# The dashboard's browser test renders the page in Debian's chromium, and the NAT tests build home routers with
# iptables in network namespaces: install them where we can (root on Debian); elsewhere those tests skip themselves
# with a reason.
missing=""
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
command -v iptables >/dev/null 2>&1 || missing="$missing iptables"
if [ -n "$missing" ] && [ "$(id -u)" = 0 ] && [ -f /etc/debian_version ]; then
  # shellcheck disable=SC2086  # one word per package
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null; } \
    || echo "could not install$missing; the tests that need them will skip" >&2
fi
python -c "import torch, hivemind; print(f'torch {torch.__version__}, hivemind {hivemind.__version__}')"
