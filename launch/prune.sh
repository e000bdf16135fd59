#!/usr/bin/env bash
# Run `python -m dtrain.prune` under torchrun on this node: launch/train.sh with JOB=dtrain.prune
# and a pruning config (the same env: NPROC, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT,
# PYTHON). From the repo root, after the training job wrote its run directory:
#
#   bash launch/train.sh && bash launch/prune.sh            # digits CNN, 90% global magnitude
#   CONFIG=configs/prune/digits_gradual.toml bash launch/prune.sh --prune.sparsity=0.95
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
JOB=dtrain.prune CONFIG=${CONFIG:-configs/prune/digits_global90.toml} exec bash "$repo/launch/train.sh" "$@"
