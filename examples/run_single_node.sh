#!/bin/bash
# SDAR CPT/SFT on one node with torchrun (all local GPUs). Resumes when $SAVE holds a checkpoint.
#
#   MODEL=qwen3-1.7b STAGE=cpt INIT_FROM=ckpt/qwen3-1.7b DATA_PATH=data/corpus_text_document \
#   SAVE=runs/qwen3-1.7b-cpt bash examples/run_single_node.sh          # DRY_RUN=1 prints the command
#
# GPUS=N sets the number of GPUs (default: those nvidia-smi lists). DRY_RUN=1 also works where there
# is no GPU or nvidia-smi (a login node): it then plans for GPUS=8 unless GPUS is set, and says so.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${MODEL:?set MODEL (qwen3-1.7b, qwen3-4b, qwen3-8b, qwen3-30b-a3b)}"
: "${STAGE:?set STAGE (cpt or sft)}"
: "${DATA_PATH:?set DATA_PATH}"
: "${SAVE:?set SAVE}"
INIT_FROM=${INIT_FROM:-}
DRY_RUN=${DRY_RUN:-}

if [[ -z "${GPUS:-}" ]]; then
    listed=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        listed=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
    fi
    if [[ "$listed" -gt 0 ]]; then
        GPUS=$listed
    elif [[ -n "$DRY_RUN" ]]; then
        GPUS=8
        echo "# GPUS=8 assumed: nvidia-smi lists no GPU here (set GPUS=N to plan for another count)"
    else
        echo "error: nvidia-smi lists no GPU here; run on a GPU node, set GPUS=N, or use DRY_RUN=1" >&2
        exit 1
    fi
fi
if ! [[ "$GPUS" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: GPUS must be a positive whole number, got '$GPUS'" >&2
    exit 1
fi

# The checkpoint to start from must be there unless $SAVE already holds one to resume.
if [[ -n "$INIT_FROM" && ! -f "$SAVE/latest_checkpointed_iteration.txt" \
      && ! -f "$INIT_FROM/latest_checkpointed_iteration.txt" ]]; then
    echo "error: INIT_FROM=$INIT_FROM holds no Megatron checkpoint (no latest_checkpointed_iteration.txt);" \
         "convert a HF model into it first (tools/convert_hf_to_mcore.py --hf-dir MODEL --save $INIT_FROM)" >&2
    exit 1
fi
export CUDA_DEVICE_MAX_CONNECTIONS=1

args=(--model "$MODEL" --stage "$STAGE" --nodes 1 --gpus-per-node "$GPUS" --data-path "$DATA_PATH" --save "$SAVE")
if [[ -n "$INIT_FROM" ]]; then
    args+=(--init-from "$INIT_FROM")
fi
if [[ -n "${EXTRA:-}" ]]; then
    args+=(--extra "$EXTRA")
fi
if [[ -n "$DRY_RUN" ]]; then
    args+=(--dry-run)
fi
exec python examples/launch.py "${args[@]}"
