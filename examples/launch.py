#!/usr/bin/env python3
"""Launch SDAR CPT/SFT for the Qwen3 family with a recommended parallel layout, or print the command.

    python examples/launch.py --model qwen3-8b --stage cpt --nodes 2 --dry-run \\
        --init-from ckpt/qwen3-8b --data-path data/corpus_text_document --save runs/qwen3-8b-cpt
    python examples/launch.py --model qwen3-30b-a3b --stage sft --nodes 4 --print-args ...   # for sbatch
    # fine-tune a released SDAR checkpoint (converted with tools/convert_hf_to_mcore.py
    # --hf-dir SDAR-30B-A3B-Chat --save ckpt/sdar-30b-a3b --expert-model-parallel-size 8)
    python examples/launch.py --model qwen3-30b-a3b --stage sft --nodes 4 --init-from ckpt/sdar-30b-a3b \\
        --data-path data/chat_sft --save runs/sdar-30b-a3b-sft

The recipe follows the paper: CPT with block size 4 on 4096-token windows, SFT on packed chat
windows (block size 4 by default; 4-64 supported). Each model has a layout per node count (tensor,
pipeline, expert parallelism, sequence parallelism, recompute) and the per-GPU memory Megatron's
theoretical estimator gives for it (weights, optimizer, activations over the 2L processed tokens).

Resume is automatic: when ``--save`` already holds a checkpoint the run continues from it (so a
requeued SLURM job picks up where it stopped); otherwise it starts from ``--init-from`` (a
checkpoint written by ``tools/convert_hf_to_mcore.py``) with ``--finetune``, which must hold a
checkpoint by then (refused before launching otherwise, dry runs included).

``--block-size-schedule`` trains with a block size that changes with the iteration
(``--sdar-block-size-schedule``): ``wsd`` warms up from 1 (AR, what a Qwen3 checkpoint already
does) through the powers of two dividing the block size, each stage twice as long as the one before,
reaching the block size after 15% of the iterations and keeping it (CPT: 10000 iterations at B=4
give ``1:0,2:500,4:1500``); an explicit ``B:ITER,...`` (e.g. ``1:0,4:2000,32:6000,8:9000``, which
decays to 8 at the end) is passed through, and its last block size becomes ``--sdar-block-size``.

The converter records the model it read in ``sdar_architecture.json`` beside the checkpoint. When
``--init-from`` has one, its block size and mask token id (those of a released SDAR model) are the
defaults for ``--block-size`` and ``--mask-token-id`` (explicit flags still win), and a checkpoint
converted from a different model than ``--model`` (layers, widths, heads, experts) is refused early.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_sdar.conversion.architecture import Architecture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN3_COMMON = [
    "--group-query-attention", "--kv-channels", "128", "--normalization", "RMSNorm",
    "--norm-epsilon", "1e-06", "--swiglu", "--disable-bias-linear", "--position-embedding-type", "rope",
    "--rotary-base", "1000000", "--qk-layernorm", "--attention-dropout", "0", "--hidden-dropout", "0",
    "--max-position-embeddings", "40960",
]  # fmt: skip
MODELS = {
    "qwen3-1.7b": dict(
        arch=["--num-layers", "28", "--hidden-size", "2048", "--num-attention-heads", "16",
              "--num-query-groups", "8", "--ffn-hidden-size", "6144"],
        layouts={1: dict(tp=1, pp=1, ep=1, mbs=2)}, tied=True,
    ),
    "qwen3-4b": dict(
        arch=["--num-layers", "36", "--hidden-size", "2560", "--num-attention-heads", "32",
              "--num-query-groups", "8", "--ffn-hidden-size", "9728"],
        layouts={1: dict(tp=2, pp=1, ep=1, mbs=2)}, tied=True,
    ),
    "qwen3-8b": dict(
        arch=["--num-layers", "36", "--hidden-size", "4096", "--num-attention-heads", "32",
              "--num-query-groups", "8", "--ffn-hidden-size", "12288",
              "--untie-embeddings-and-output-weights"],
        layouts={1: dict(tp=4, pp=1, ep=1, mbs=1), 2: dict(tp=2, pp=1, ep=1, mbs=1)}, tied=False,
    ),
    "qwen3-30b-a3b": dict(
        arch=["--num-layers", "48", "--hidden-size", "2048", "--num-attention-heads", "32",
              "--num-query-groups", "4", "--ffn-hidden-size", "6144", "--untie-embeddings-and-output-weights",
              "--num-experts", "128", "--moe-ffn-hidden-size", "768", "--moe-router-topk", "8",
              "--moe-router-load-balancing-type", "aux_loss", "--moe-aux-loss-coeff", "0.001",
              "--moe-token-dispatcher-type", "alltoall"],
        layouts={1: dict(tp=1, pp=2, ep=4, mbs=1), 2: dict(tp=1, pp=2, ep=8, mbs=1),
                 4: dict(tp=1, pp=1, ep=8, mbs=1)}, tied=False,
    ),
}  # fmt: skip
DEFAULT_MASK_TOKEN_ID = 151669  # Qwen3's first unused vocabulary row
STAGES = {
    "cpt": dict(seq=4096, block=4, lr=1e-5, min_lr=1e-6, gbs=256, iters=10000, decay="cosine"),
    "sft": dict(seq=4096, block=4, lr=1e-5, min_lr=1e-5, gbs=128, iters=3000, decay="constant"),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), required=True)
    p.add_argument("--stage", choices=sorted(STAGES), required=True)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--init-from", help="converted checkpoint to start from (used when --save is empty)")
    p.add_argument(
        "--data-path", nargs="+", required=True, help="as Megatron's --data-path (weights allowed)"
    )
    p.add_argument("--tokenizer", help="HF tokenizer directory (default: --init-from/tokenizer)")
    p.add_argument("--save", required=True, help="checkpoints and logs (shared storage)")
    p.add_argument("--seq-length", type=int, default=None)
    p.add_argument(
        "--block-size", type=int, default=None,
        help="default: the one --init-from's sdar_architecture.json records, else the stage's (4)",
    )  # fmt: skip
    p.add_argument(
        "--block-size-schedule", default=None, metavar="wsd|B:ITER,...",
        help="block size by iteration: 'wsd' (from 1 by doubling to the block size over the first 15%% of "
        "iterations) or an explicit schedule ending on the block size (default: none, a fixed block size)",
    )  # fmt: skip
    p.add_argument("--global-batch-size", type=int, default=None)
    p.add_argument("--train-iters", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument(
        "--mask-token-id", type=int, default=None,
        help="default: the one --init-from's sdar_architecture.json records, else "
        f"{DEFAULT_MASK_TOKEN_ID}",
    )  # fmt: skip
    p.add_argument("--wandb-project", default=None)
    p.add_argument("--dry-run", action="store_true", help="print the torchrun command and memory, do not run")
    p.add_argument("--print-args", action="store_true", help="print only pretrain_sdar.py's arguments")
    p.add_argument("--extra", default="", help="more Megatron/SDAR flags, quoted")
    return p.parse_args(argv)


def layout_for(model: str, nodes: int) -> dict:
    layouts = MODELS[model]["layouts"]
    fitting = [n for n in layouts if n <= nodes]
    if not fitting:
        raise SystemExit(f"error: {model} needs at least {min(layouts)} node(s)")
    return layouts[max(fitting)]


def last_value(flags: list[str], name: str, default: str | None = None) -> str | None:
    """The value Megatron's parser keeps for ``name``: that of its last occurrence (``--extra`` comes
    last, so its flags win), written ``name value`` or ``name=value``."""
    value = default
    for i, flag in enumerate(flags):
        if flag == name and i + 1 < len(flags):
            value = flags[i + 1]
        elif flag.startswith(name + "="):
            value = flag.partition("=")[2]
    return value


def layout_flags(args: argparse.Namespace, nodes: int) -> list[str]:
    """The flags that fix the parallel layout on ``nodes`` nodes: the layout, the batch sizes, the
    model's experts, and ``--extra`` (which may override any of them)."""
    lay = layout_for(args.model, nodes)
    gbs = args.global_batch_size or STAGES[args.stage]["gbs"]
    return [
        *MODELS[args.model]["arch"],
        "--tensor-model-parallel-size", str(lay["tp"]), "--pipeline-model-parallel-size", str(lay["pp"]),
        "--expert-model-parallel-size", str(lay["ep"]), "--micro-batch-size", str(lay["mbs"]),
        "--global-batch-size", str(gbs), *shlex.split(args.extra),
    ]  # fmt: skip


def layout_problems(flags: list[str], nodes: int, gpus_per_node: int) -> list[str]:
    """What Megatron would stop on (an assertion, deep in its set-up) in the layout ``flags`` give on
    ``nodes`` x ``gpus_per_node`` GPUs, each saying which number to change."""

    def number(name: str, default: int) -> int:
        return int(last_value(flags, name, str(default)))

    tp, pp = number("--tensor-model-parallel-size", 1), number("--pipeline-model-parallel-size", 1)
    cp, ep = number("--context-parallel-size", 1), number("--expert-model-parallel-size", 1)
    etp = number("--expert-tensor-parallel-size", tp)
    mbs, gbs = number("--micro-batch-size", 1), number("--global-batch-size", 1)
    experts = number("--num-experts", 0)
    world = nodes * gpus_per_node
    if nodes < 1 or gpus_per_node < 1:
        return [f"--nodes {nodes} x --gpus-per-node {gpus_per_node}: both must be at least 1"]
    split = f"TP {tp} x PP {pp}" + (f" x CP {cp}" if cp > 1 else "")
    if world % (tp * pp * cp):
        return [f"{world} GPUs ({nodes} node(s) x {gpus_per_node}) do not divide into {split} = "
                f"{tp * pp * cp}: use a GPU count that is a multiple of {tp * pp * cp}"]  # fmt: skip
    dp = world // (tp * pp * cp)
    problems = []
    step = mbs * dp
    if gbs % step:
        lower = gbs - gbs % step
        sizes = " or ".join(str(v) for v in (lower, lower + step) if v > 0)
        problems.append(f"--global-batch-size {gbs} is not a multiple of micro-batch size {mbs} x "
                        f"data-parallel size {dp} = {step} (data-parallel size: {world} GPUs / ({split})): "
                        f"pass --global-batch-size {sizes}")  # fmt: skip
    if ep > 1 and not experts:
        problems.append(f"expert parallelism EP {ep} needs a model with experts: drop "
                        "--expert-model-parallel-size")  # fmt: skip
    if experts and experts % ep:
        problems.append(f"{experts} experts do not divide over EP {ep}: use an EP that divides {experts}")
    if ep > 1 and (world // pp) % (etp * ep):
        problems.append(f"EP {ep} x expert TP {etp} = {etp * ep} must divide the {world // pp} GPUs of a "
                        f"pipeline stage (data-parallel size {dp} x {split.replace(f' x PP {pp}', '')}): use "
                        f"an EP that divides {world // pp // etp}")  # fmt: skip
    return problems


def check_layout(args: argparse.Namespace) -> None:
    """Refuse, before Megatron asserts on it, a layout that does not fit ``--nodes`` x
    ``--gpus-per-node``; name node counts where the recipe's layout does fit."""
    flags = layout_flags(args, args.nodes)
    problems = layout_problems(flags, args.nodes, args.gpus_per_node)
    if not problems:
        return
    first = min(MODELS[args.model]["layouts"])
    near = sorted(range(first, max(4 * args.nodes, 8) + 1), key=lambda n: (abs(n - args.nodes), n))
    fits = [n for n in near if n != args.nodes
            and not layout_problems(layout_flags(args, n), n, args.gpus_per_node)][:2]  # fmt: skip
    hint = f"\n(or use --nodes {' or '.join(str(n) for n in sorted(fits))}, where it fits)" if fits else ""
    sizes = " ".join(
        f"{name}={last_value(flags, f'--{flag}-parallel-size', '1')}"
        for name, flag in (("TP", "tensor-model"), ("PP", "pipeline-model"), ("EP", "expert-model"))
    )
    raise SystemExit(
        f"error: {args.model} {args.stage} does not fit {args.nodes} node(s) x {args.gpus_per_node} GPUs "
        f"with {sizes}:\n  - " + "\n  - ".join(problems) + hint
    )


def has_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "latest_checkpointed_iteration.txt"))


def recorded_architecture(init_from: str | None) -> Architecture | None:
    """The architecture ``tools/convert_hf_to_mcore.py`` recorded beside ``init_from`` (``None`` when
    there is no such file, e.g. a checkpoint written by training)."""
    if not init_from:
        return None
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from megatron_sdar.conversion.architecture import Architecture
    from megatron_sdar.conversion.megatron import ARCHITECTURE_FILE

    path = os.path.join(init_from, ARCHITECTURE_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return Architecture(**json.load(f)["architecture"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"error: cannot read the architecture recorded in {path}: {err}") from None


def model_shape(model: str) -> dict:
    """What ``--model``'s flags fix about the weights, named as the recorded architecture names it."""
    flags = MODELS[model]["arch"] + QWEN3_COMMON

    def value(flag: str, default: str = "0") -> str:
        return flags[flags.index(flag) + 1] if flag in flags else default

    shape = {
        "num_layers": int(value("--num-layers")), "hidden_size": int(value("--hidden-size")),
        "ffn_hidden_size": int(value("--ffn-hidden-size")),
        "num_attention_heads": int(value("--num-attention-heads")),
        "num_query_groups": int(value("--num-query-groups")), "kv_channels": int(value("--kv-channels")),
        "num_experts": int(value("--num-experts")),
        "tied_embeddings": "--untie-embeddings-and-output-weights" not in flags,
        "qk_layernorm": "--qk-layernorm" in flags,
        "rotary_base": float(value("--rotary-base")), "norm_epsilon": float(value("--norm-epsilon")),
    }  # fmt: skip
    if shape["num_experts"]:
        shape["moe_ffn_hidden_size"] = int(value("--moe-ffn-hidden-size"))
        shape["moe_router_topk"] = int(value("--moe-router-topk"))
        shape["moe_norm_topk_prob"] = "--moe-router-pre-softmax" not in flags
    return shape


def _describe(field: str, value: object) -> str:
    words = {
        "num_layers": f"{value} layers", "hidden_size": f"hidden size {value}",
        "ffn_hidden_size": f"FFN hidden size {value}", "num_attention_heads": f"{value} attention heads",
        "num_query_groups": f"{value} query groups", "kv_channels": f"head size {value}",
        "num_experts": f"{value} experts" if value else "no experts",
        "moe_ffn_hidden_size": f"expert FFN hidden size {value}", "moe_router_topk": f"top-{value} routing",
        "moe_norm_topk_prob": "top-k weights renormalised" if value else "top-k weights not renormalised",
        "tied_embeddings": "tied embeddings" if value else "untied embeddings",
        "qk_layernorm": "QK layernorm" if value else "no QK layernorm",
        "rotary_base": f"RoPE base {value:.0f}", "norm_epsilon": f"norm epsilon {value:g}",
    }  # fmt: skip
    return words[field]


def shape_mismatches(model: str, arch: Architecture) -> list[tuple[str, str]]:
    """``(recorded, --model's)`` descriptions of every field where ``arch`` and ``model`` differ."""
    out = []
    for field, mine in model_shape(model).items():
        if field.startswith("moe_") and not arch.num_experts:
            continue  # already told by the expert counts
        recorded = getattr(arch, field)
        if isinstance(mine, float) and recorded is not None:
            recorded = float(recorded)
        if recorded != mine:
            out.append((_describe(field, recorded), _describe(field, mine)))
    return out


def check_init_architecture(args: argparse.Namespace, arch: Architecture) -> None:
    """Refuse an ``--init-from`` converted from another model than ``--model``."""
    mismatches = shape_mismatches(args.model, arch)
    if not mismatches:
        return
    fits = [name for name in sorted(MODELS) if not shape_mismatches(name, arch)]
    hint = f"use --model {fits[0]}" if fits else "no --model here has that architecture"
    raise SystemExit(
        f"error: {args.init_from} was converted from a model with "
        f"{', '.join(recorded for recorded, _ in mismatches)}; --model {args.model} has "
        f"{', '.join(mine for _, mine in mismatches)} ({hint})"
    )


def _first_given(*values):
    return next(v for v in values if v is not None)


def block_size_schedule(args: argparse.Namespace, block: int, iters: int):
    """The ``--block-size-schedule`` asked for (``None`` without one): ``wsd`` warms up to ``block``
    over ``iters`` iterations; an explicit schedule must end on ``--block-size`` when that is given."""
    if args.block_size_schedule is None:
        return None
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from megatron_sdar.schedule import BlockSizeSchedule, warmup_schedule

    try:
        if args.block_size_schedule == "wsd":
            return warmup_schedule(block, iters)
        schedule = BlockSizeSchedule.parse(args.block_size_schedule)
    except ValueError as err:
        raise SystemExit(f"error: --block-size-schedule {args.block_size_schedule!r}: {err}") from None
    if args.block_size is not None and args.block_size != schedule.final:
        raise SystemExit(
            f"error: --block-size-schedule ends at block size {schedule.final} but --block-size is "
            f"{args.block_size}: the schedule ends on the block size the model is decoded with (drop "
            "--block-size, or end the schedule on it)"
        )
    return schedule


def pretrain_args(args: argparse.Namespace) -> list[str]:
    model, stage = MODELS[args.model], STAGES[args.stage]
    arch = recorded_architecture(args.init_from)
    if arch is not None:
        check_init_architecture(args, arch)
    recorded_block = arch.block_size if arch is not None else None
    recorded_mask = arch.mask_token_id if arch is not None else None
    lay = layout_for(args.model, args.nodes)
    check_layout(args)
    seq = args.seq_length or stage["seq"]
    iters = args.train_iters or stage["iters"]
    block = _first_given(args.block_size, recorded_block, stage["block"])
    mask_token_id = _first_given(args.mask_token_id, recorded_mask, DEFAULT_MASK_TOKEN_ID)
    schedule = block_size_schedule(args, block, iters)
    if schedule is not None:
        block = schedule.final
    if seq % block:
        raise SystemExit(f"error: --seq-length {seq} is not a multiple of the block size {block}")
    if schedule is not None and schedule.problems(seq):
        raise SystemExit(f"error: {schedule.problems(seq)[0]}")
    tokenizer = args.tokenizer or (os.path.join(args.init_from, "tokenizer") if args.init_from else None)
    if tokenizer is None:
        raise SystemExit("error: pass --tokenizer or --init-from (whose tokenizer/ folder is used)")
    if has_checkpoint(args.save):
        start = ["--load", args.save]  # resume (requeue)
    elif args.init_from:
        if not os.path.isdir(args.init_from):
            raise SystemExit(
                f"error: --init-from {args.init_from} does not exist; convert a HF model into it first "
                f"(tools/convert_hf_to_mcore.py --hf-dir MODEL --save {args.init_from})"
            )
        if not has_checkpoint(args.init_from):
            raise SystemExit(
                f"error: --init-from {args.init_from} holds no Megatron checkpoint (no "
                "latest_checkpointed_iteration.txt); pass the --save folder of tools/convert_hf_to_mcore.py "
                "or of an earlier run"
            )
        start = ["--load", args.init_from, "--finetune"]
    else:
        raise SystemExit(f"error: {args.save} holds no checkpoint to resume; pass --init-from")
    out = [
        *model["arch"], *QWEN3_COMMON,
        "--tensor-model-parallel-size", str(lay["tp"]), "--pipeline-model-parallel-size", str(lay["pp"]),
        "--expert-model-parallel-size", str(lay["ep"]),
        "--seq-length", str(seq), "--micro-batch-size", str(lay["mbs"]),
        "--global-batch-size", str(args.global_batch_size or stage["gbs"]),
        "--train-iters", str(iters), "--lr", str(args.lr or stage["lr"]), "--min-lr", str(stage["min_lr"]),
        "--lr-decay-style", stage["decay"], "--lr-warmup-fraction", "0.03", "--weight-decay", "0.1",
        "--clip-grad", "1.0", "--adam-beta2", "0.95", "--bf16", "--use-distributed-optimizer",
        "--overlap-grad-reduce", "--overlap-param-gather", "--calculate-per-token-loss",
        "--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1",
        "--transformer-impl", "transformer_engine", "--cross-entropy-loss-fusion",
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer,
        "--data-path", *args.data_path, "--save", args.save, "--save-interval", "500",
        "--log-interval", "10", "--tensorboard-dir", os.path.join(args.save, "tensorboard"),
        "--exit-signal-handler", "--ckpt-format", "torch_dist",
        "--sdar-stage", args.stage, "--sdar-block-size", str(block),
        "--sdar-mask-token-id", str(mask_token_id),
        *start,
    ]  # fmt: skip
    if schedule is not None:
        out += ["--sdar-block-size-schedule", str(schedule)]
    if lay["tp"] > 1:
        out.append("--sequence-parallel")
    if args.stage == "cpt":
        out += ["--split", "998,2,0", "--eval-interval", "1000", "--eval-iters", "10"]
    else:
        out += ["--eval-iters", "0", "--eval-interval", str(iters)]
    if args.wandb_project:
        out += [
            "--wandb-project",
            args.wandb_project,
            "--wandb-exp-name",
            os.path.basename(args.save.rstrip("/")),
        ]
    return out + shlex.split(args.extra)


def memory_estimate(args: argparse.Namespace, flags: list[str]) -> dict:
    """Per-GPU memory (GB) on the first pipeline stage.

    Weights, gradients and optimizer state come from Megatron's theoretical estimator. Activations
    are counted for what SDAR runs, 2L tokens per sample with full recompute: each layer's stored
    input (split by sequence parallelism), one layer's working set (Megatron's per-layer formula),
    times the micro-batches in flight under 1F1B, plus the fp32 logits of the noised half.
    """
    import contextlib
    import io

    sys.path.insert(0, ROOT)
    from megatron_sdar import compat

    compat.ignore_known_warnings()  # the megatron-core / torch notices named there, nothing else
    from megatron.training.arguments import parse_args as megatron_parse_args
    from megatron.training.arguments import validate_args
    from megatron.training.theoretical_memory_usage import compute_weight_and_optimizer_memory

    import pretrain_sdar

    saved = sys.argv, dict(os.environ)
    os.environ.update(WORLD_SIZE=str(args.nodes * args.gpus_per_node), RANK="0")
    # (sequence parallelism is accounted below; Megatron's validation of it probes the GPU)
    sys.argv = ["pretrain_sdar.py", *[f for f in flags if f not in ("--finetune", "--sequence-parallel")]]
    try:
        parsed = megatron_parse_args(pretrain_sdar._extra_args)
        parsed.padded_vocab_size = 151936
        tp_size = parsed.tensor_model_parallel_size
        parsed.tensor_model_parallel_size = 1  # Megatron validates TP > 1 against the local GPU
        with contextlib.redirect_stdout(io.StringIO()):
            validate_args(parsed, {})
            parsed.tensor_model_parallel_size = tp_size
            parsed.expert_tensor_parallel_size = tp_size
            parsed.data_parallel_size //= tp_size
            weights = compute_weight_and_optimizer_memory(parsed)
    finally:
        sys.argv = saved[0]
        os.environ.clear()
        os.environ.update(saved[1])
    tp, pp = parsed.tensor_model_parallel_size, parsed.pipeline_model_parallel_size
    tokens = 2 * parsed.seq_length * parsed.micro_batch_size  # [x_t ; x_0]
    h, layers = parsed.hidden_size, parsed.num_layers // pp
    split = tp if tp > 1 else 1  # sequence parallelism whenever TP > 1
    stored = layers * tokens * h * 2 / split  # bf16 layer inputs kept for recompute
    working = tokens * h * (10 + 24 / tp)  # one layer recomputed at a time
    logits = 2 * (tokens // 2) * (parsed.padded_vocab_size / tp) * 4  # noised-half fp32 logits + grad
    activations = (stored + working) * pp + logits
    gb = 1024**3
    return {"weights_and_optimizer_gb": weights / gb, "activations_gb": activations / gb,
            "total_gb": (weights + activations) / gb}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    flags = pretrain_args(args)
    if args.print_args:
        print(shlex.join(flags))
        return {"args": flags}
    cmd = [
        "torchrun", "--nnodes", str(args.nodes), "--nproc-per-node", str(args.gpus_per_node),
        os.path.join(ROOT, "pretrain_sdar.py"), *flags,
    ]  # fmt: skip
    memory = memory_estimate(args, flags)
    lay = layout_for(args.model, args.nodes)
    print(f"# {args.model} {args.stage} on {args.nodes} x {args.gpus_per_node} GPUs: TP={lay['tp']} "
          f"PP={lay['pp']} EP={lay['ep']}; estimated {memory['total_gb']:.1f} GB per GPU "
          f"({memory['weights_and_optimizer_gb']:.1f} weights+optimizer, "
          f"{memory['activations_gb']:.1f} activations)")  # fmt: skip
    print(shlex.join(cmd))
    if not args.dry_run:
        os.execvp(cmd[0], cmd)
    return {"command": cmd, "memory": memory}


if __name__ == "__main__":
    main()
