#!/bin/bash
# SDAR CPT/SFT on one node with torchrun (all local GPUs). Resumes when $SAVE holds a checkpoint.
#
#   MODEL=qwen3-1.7b STAGE=cpt INIT_FROM=ckpt/qwen3-1.7b DATA_PATH=data/corpus_text_document \
#   SAVE=runs/qwen3-1.7b-cpt bash examples/run_single_node.sh          # DRY_RUN=1 prints the command
#
# GPUS=N sets the number of GPUs (default: those nvidia-smi lists). DRY_RUN=1 also works where there
# is no GPU or nvidia-smi (a login node): it then plans for GPUS=8 unless GPUS is set, and says so.
# RECIPE=released|wsd|wsd-ar picks launch.py's recipe (python examples/launch.py --list-recipes);
# BLOCK_SIZE=B and BLOCK_SIZE_SCHEDULE=wsd|B:ITER,... (e.g. 1:0,4:2000,32:6000,8:9000) set the block
# size and its schedule; EXTRA="--flag value ..." adds pretrain_sdar.py flags (they come last and win).
#
#   MODEL=qwen3-1.7b STAGE=cpt RECIPE=wsd-ar INIT_FROM=ckpt/qwen3-1.7b DATA_PATH=data/corpus_text_document \
#   SAVE=runs/qwen3-1.7b-cpt-ar DRY_RUN=1 bash examples/run_single_node.sh
set -euo pipefail
cd "$(dirname "$0")/.."

: "${MODEL:?set MODEL (qwen3-1.7b, qwen3-4b, qwen3-8b, qwen3-30b-a3b)}"
: "${STAGE:?set STAGE (cpt or sft)}"
: "${DATA_PATH:?set DATA_PATH}"
: "${SAVE:?set SAVE}"
INIT_FROM=${INIT_FROM:-}
DRY_RUN=${DRY_RUN:-}
RECIPE=${RECIPE:-}
BLOCK_SIZE=${BLOCK_SIZE:-}
BLOCK_SIZE_SCHEDULE=${BLOCK_SIZE_SCHEDULE:-}
EXTRA=${EXTRA:-}

# The recipe settings launch.py takes, checked before anything else runs (launch.py checks them further).
if [[ -n "$RECIPE" && ! "$RECIPE" =~ ^(released|wsd|wsd-ar)$ ]]; then
    echo "error: RECIPE must be released, wsd or wsd-ar (python examples/launch.py --list-recipes)," \
         "got '$RECIPE'" >&2
    exit 1
fi
if [[ -n "$BLOCK_SIZE" && ! "$BLOCK_SIZE" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: BLOCK_SIZE must be a positive whole number, got '$BLOCK_SIZE'" >&2
    exit 1
fi
schedule_form='^(wsd|[1-9][0-9]*:[0-9]+(,[1-9][0-9]*:[0-9]+)*)$'
if [[ -n "$BLOCK_SIZE_SCHEDULE" && ! "$BLOCK_SIZE_SCHEDULE" =~ $schedule_form ]]; then
    echo "error: BLOCK_SIZE_SCHEDULE must be wsd or B:ITER,... (e.g. 1:0,4:2000,32:6000,8:9000)," \
         "got '$BLOCK_SIZE_SCHEDULE'" >&2
    exit 1
fi

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
if [[ -n "$RECIPE" ]]; then
    args+=(--recipe "$RECIPE")
fi
if [[ -n "$BLOCK_SIZE" ]]; then
    args+=(--block-size "$BLOCK_SIZE")
fi
if [[ -n "$BLOCK_SIZE_SCHEDULE" ]]; then
    args+=(--block-size-schedule "$BLOCK_SIZE_SCHEDULE")
fi
if [[ -n "$EXTRA" ]]; then
    args+=(--extra "$EXTRA")
fi
if [[ -n "$DRY_RUN" ]]; then
    args+=(--dry-run)
fi
exec python examples/launch.py "${args[@]}"
