#!/usr/bin/env bash
# Make .venv in the repo root and install dtrain with its test tools (idempotent).
# Without an NVIDIA GPU, the CPU build of PyTorch (torch==2.13.0) is installed first, so that
# `pip install -e .[dev]` finds torch satisfied and never downloads the multi-GB CUDA build.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

py=python3
[[ -x .venv/bin/python ]] && py=.venv/bin/python
if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "setup.sh: dtrain needs Python >= 3.11; $py is $("$py" --version 2>/dev/null || echo "not found")" >&2
    exit 1
fi
[[ -x .venv/bin/python ]] || python3 -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)

if ! nvidia-smi -L >/dev/null 2>&1; then
    # PyPI's Linux torch wheel is the CUDA build: take the CPU build from PyTorch's CPU index
    # (a local find-links / mirror that holds it also serves); plain PyPI only if that fails.
    # A no-op when torch 2.13.0 is already installed.
    "${pip[@]}" --index-url https://download.pytorch.org/whl/cpu --timeout 20 --retries 1 \
        "torch==2.13.0" || "${pip[@]}" "torch==2.13.0"
fi
"${pip[@]}" -e ".[dev]"

echo "dtrain set up in $(pwd)/.venv"
