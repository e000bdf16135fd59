#!/usr/bin/env bash
# Run a dtrain job (`python -m dtrain.train`, or $JOB) under torchrun on this node. Settings come from the environment;
# the arguments go to the job (`--section.key=value` overrides, `--resume`). From the repo root:
#
#   bash launch/train.sh                                  # one process per GPU, or 2 on CPU
#   NPROC=4 bash launch/train.sh --run.max_steps=100 --logging.progress=false
#   CONFIG=configs/other.toml bash launch/train.sh --resume
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash launch/train.sh   # on node0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 bash launch/train.sh   # on node1
#
# Env: NPROC (per node), NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500),
# CONFIG (configs/digits.toml), JOB (the job's module: dtrain.train; launch/prune.sh sets
# dtrain.prune), PYTHON (the repo's .venv/bin/python, else python3).
# `--check` runs first for the whole world size, so bad input costs one line and exit code 2
# before torchrun starts a single process. On SLURM use slurm/train.sbatch instead.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -n ${CUDA_VISIBLE_DEVICES+x} ]]; then  # the GPUs this job may use, not all the node has
    gpus=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c '[^[:space:]]' || true)
else
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
NPROC=${NPROC:-$((gpus > 0 ? gpus : 2))}
NNODES=${NNODES:-1}
JOB=${JOB:-dtrain.train}
CONFIG=${CONFIG:-configs/digits.toml}
venv=$repo/.venv/bin/python
PYTHON=${PYTHON:-$([[ -x $venv ]] && echo "$venv" || echo python3)}

# RANK=0: the check reads WORLD_SIZE even inside a Slurm allocation.
RANK=0 WORLD_SIZE=$((NPROC * NNODES)) "$PYTHON" -m "$JOB" --check --config "$CONFIG" "$@"
exec "$PYTHON" -m torch.distributed.run --nproc_per_node="$NPROC" --nnodes="$NNODES" \
    --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}" \
    --master_port="${MASTER_PORT:-29500}" -m "$JOB" --config "$CONFIG" "$@"
