#!/bin/bash
# SDAR CPT/SFT on one node with torchrun (all local GPUs). Resumes when $SAVE holds a checkpoint.
#
#   MODEL=qwen3-1.7b STAGE=cpt INIT_FROM=ckpt/qwen3-1.7b DATA_PATH=data/corpus_text_document \
#   SAVE=runs/qwen3-1.7b-cpt bash examples/run_single_node.sh          # DRY_RUN=1 prints the command
set -euo pipefail
cd "$(dirname "$0")/.."

: "${MODEL:?set MODEL (qwen3-1.7b, qwen3-4b, qwen3-8b, qwen3-30b-a3b)}"
: "${STAGE:?set STAGE (cpt or sft)}"
: "${DATA_PATH:?set DATA_PATH}"
: "${SAVE:?set SAVE}"
GPUS=${GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
GPUS=${GPUS:-8}
export CUDA_DEVICE_MAX_CONNECTIONS=1

args=(--model "$MODEL" --stage "$STAGE" --nodes 1 --gpus-per-node "$GPUS" --data-path "$DATA_PATH" --save "$SAVE")
if [[ -n "${INIT_FROM:-}" ]]; then
    args+=(--init-from "$INIT_FROM")
fi
if [[ -n "${EXTRA:-}" ]]; then
    args+=(--extra "$EXTRA")
fi
if [[ -n "${DRY_RUN:-}" ]]; then
    args+=(--dry-run)
fi
exec python examples/launch.py "${args[@]}"
