#!/usr/bin/env bash
# Launch megamm.train on NNODES nodes x 8 GPUs with torchrun's c10d rendezvous. Run this script
# once on every node (same arguments, same environment); torchrun starts 8 processes per node.
#
# Environment:
#   NNODES       number of nodes taking part (default 1)
#   MASTER_ADDR  host name or address of the rendezvous node, reachable from every node
#                (default localhost, which only works for NNODES=1)
#   MASTER_PORT  TCP port of the rendezvous on MASTER_ADDR (default 29500)
#   JOB_ID       rendezvous id, the same on every node and unique per job (default megamm)
#   CONFIG       the run's YAML file (default examples/llava_7b_gpu.yaml)
#   TORCHRUN     the launcher (default the repository's .venv/bin/torchrun if present, else
#                torchrun on PATH)
#
# Layout: tensor parallel 4 with sequence parallelism; ranks are ordered tp fastest, so each
# group of 4 tensor-parallel peers lies inside one node and data parallelism spans the rest
# (dp = 2 x NNODES). The global batch must be a multiple of micro batch x dp.
#
# Example, two nodes:
#   node0$ NNODES=2 MASTER_ADDR=node0 MASTER_PORT=29500 JOB_ID=llava-42 examples/launch_multinode.sh
#   node1$ NNODES=2 MASTER_ADDR=node0 MASTER_PORT=29500 JOB_ID=llava-42 examples/launch_multinode.sh
# Extra arguments go to megamm.train and win over the YAML, e.g. --train-iters 100 --log-interval 1.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

NNODES="${NNODES:-1}"
MASTER_ADDR="${MASTER_ADDR:-localhost}"
MASTER_PORT="${MASTER_PORT:-29500}"
JOB_ID="${JOB_ID:-megamm}"
CONFIG="${CONFIG:-examples/llava_7b_gpu.yaml}"
if [[ -z "${TORCHRUN:-}" ]]; then
    if [[ -x .venv/bin/torchrun ]]; then TORCHRUN=.venv/bin/torchrun; else TORCHRUN=torchrun; fi
fi

exec "$TORCHRUN" \
    --nnodes "$NNODES" \
    --nproc-per-node 8 \
    --rdzv-backend c10d \
    --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
    --rdzv-id "$JOB_ID" \
    -m megamm.train \
    --config "$CONFIG" \
    --tensor-model-parallel-size 4 \
    --sequence-parallel \
    --bf16 \
    --use-distributed-optimizer \
    --overlap-grad-reduce \
    "$@"
