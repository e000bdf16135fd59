#!/usr/bin/env bash
# Run `python -m dtrain.distill` under torchrun on this node: launch/train.sh with
# JOB=dtrain.distill and a distillation config (the same env: NPROC, NNODES, NODE_RANK,
# MASTER_ADDR, MASTER_PORT, PYTHON). From the repo root, after the teacher's training job wrote
# its run directory:
#
#   bash launch/train.sh --model.width=32 --run.name=teacher-w32 && bash launch/distill.sh
#   bash launch/distill.sh --distill.features=conv2:conv2 --distill.temperature=2
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
JOB=dtrain.distill CONFIG=${CONFIG:-configs/distill/digits_kd.toml} exec bash "$repo/launch/train.sh" "$@"
