#!/usr/bin/env bash
# Run `python -m dtrain.pipeline` under torchrun on this node: launch/train.sh with
# JOB=dtrain.pipeline and a pipeline config (the same env: NPROC, NNODES, NODE_RANK,
# MASTER_ADDR, MASTER_PORT, PYTHON). From the repo root, after the source's training job wrote
# its run directory:
#
#   bash launch/train.sh && bash launch/pipeline.sh
#   bash launch/pipeline.sh --resume                     # continue an unfinished stage
#   bash launch/pipeline.sh --pipeline.stages=lowrank,quantize,export --pipeline.name=no-kd
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
JOB=dtrain.pipeline CONFIG=${CONFIG:-configs/pipeline/digits.toml} exec bash "$repo/launch/train.sh" "$@"
