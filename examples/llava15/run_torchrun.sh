#!/usr/bin/env bash
# The LLaVA-1.5 recipe with torchrun: convert -> stage 1 -> stage 2 -> export. Run this script on
# every node (same arguments and environment, a file system shared by all nodes); node 0 does the
# one-process conversion steps while the others wait for their result.
#
#   CLIP_DIR=/models/clip-vit-large-patch14-336 VICUNA_DIR=/models/vicuna-7b-v1.5 \
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 examples/llava15/run_torchrun.sh     # on node0
#   ... NODE_RANK=1 ...                                                            # on node1
#
# Environment:
#   CLIP_DIR     Hugging Face CLIP directory (openai/clip-vit-large-patch14-336)       (required)
#   VICUNA_DIR   Hugging Face LLaMA directory (lmsys/vicuna-7b-v1.5); also the tokenizer (required)
#   NNODES       nodes (default 2: the configs' layouts are sized for 2 x 8 GPUs)
#   NODE_RANK    this node's rank, 0 .. NNODES-1 (default 0)
#   MASTER_ADDR  node 0's address (default localhost), MASTER_PORT (default 29500)
#   GPUS         processes per node (default 8)
#   OUT_DIR      where the final Hugging Face directory goes (default checkpoints/llava15/llava-1.5-7b-hf)
# Checkpoints go under checkpoints/llava15/ (the paths in the two YAML files). Extra arguments are
# passed to both training stages (e.g. --train-iters 20 for a smoke run).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
: "${CLIP_DIR:?set CLIP_DIR to the CLIP ViT-L/14-336 directory}"
: "${VICUNA_DIR:?set VICUNA_DIR to the Vicuna-7B directory}"
NNODES="${NNODES:-2}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-localhost}"
MASTER_PORT="${MASTER_PORT:-29500}"
GPUS="${GPUS:-8}"
OUT_DIR="${OUT_DIR:-checkpoints/llava15/llava-1.5-7b-hf}"
if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; TORCHRUN=.venv/bin/torchrun; else PYTHON=python; TORCHRUN=torchrun; fi
STAGE0=checkpoints/llava15/stage0

wait_for() {  # wait until a checkpoint directory has a 'latest' (written last, atomically)
    until [[ -f "$1/latest" ]]; do sleep 10; done
}

# 1. Conversion: CLIP + Vicuna -> megamm checkpoint (no projector: stage 1 initializes it). The image
#    token takes id 32000, the pad token 32001, and the vocabulary is padded to 32064 as in llava-hf.
if [[ "$NODE_RANK" == 0 && ! -f "$STAGE0/latest" ]]; then
    "$PYTHON" tools/convert_checkpoint.py import-hf --vision "$CLIP_DIR" --text "$VICUNA_DIR" --save "$STAGE0" \
        --projector-type mlp2x_gelu --vision-feature-layer -2 --vision-feature-select-strategy default \
        --image-token-id 32000 --pad-token-id 32001 --vocab-multiple 64 \
        --tensor-model-parallel-size 4 --pipeline-model-parallel-size 2 --dtype bf16
fi
wait_for "$STAGE0"

train() {
    "$TORCHRUN" --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS" \
        --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
        -m megamm.train --config "$1" --tokenizer-model "$VICUNA_DIR" "${@:2}"
}

# 2. Stage 1: projector only (lr 1e-3, global batch 256).
train examples/llava15/stage1_pretrain.yaml "$@"
# 3. Stage 2: projector + language model (lr 2e-5, global batch 128).
train examples/llava15/stage2_finetune.yaml "$@"

# 4. Export: the last stage-2 checkpoint -> Hugging Face LLaVA directory with Vicuna's tokenizer.
if [[ "$NODE_RANK" == 0 ]]; then
    "$PYTHON" tools/convert_checkpoint.py export-hf --load checkpoints/llava15/stage2 --out "$OUT_DIR" \
        --tokenizer "$VICUNA_DIR" --dtype bf16
fi
