#!/usr/bin/env bash
# Train the tiny LLaVA-style model of examples/tiny_cpu.yaml on the CPU: 2 processes (gloo),
# tensor parallel over both with sequence parallelism, synthetic data (the YAML sets mock_data).
# About a minute on 2 cores; the loss falls from about 5.6 to about 0.2.
#
#   examples/train_tiny_cpu.sh                       # as configured
#   examples/train_tiny_cpu.sh --train-iters 20      # any extra flag is passed to megamm.train
#
# Runs from any directory. Uses the repository's .venv when it exists, else torchrun on PATH.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -x .venv/bin/torchrun ]]; then
    TORCHRUN=.venv/bin/torchrun
else
    TORCHRUN=torchrun
fi

# One thread per process: the two processes share the machine's cores.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

exec "$TORCHRUN" --nproc-per-node 2 -m megamm.train --config examples/tiny_cpu.yaml \
    --tensor-model-parallel-size 2 --sequence-parallel "$@"
