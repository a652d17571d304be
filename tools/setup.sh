#!/usr/bin/env bash
# All set-up on a fresh Debian machine with Python 3.11: virtual environment, PyTorch,
# the rsq package (editable, with the export formats' packages), and Fashion-MNIST from
# Debian's package into the user cache.
# Safe to run again: every step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
    # torch 2.14.1 + torchvision 0.29.1 install from this machine's local wheel store.
    .venv/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1
fi
.venv/bin/pip install --quiet -e '.[test,export]'
.venv/bin/rsq fetch-data
