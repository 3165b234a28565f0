#!/usr/bin/env python3
"""Launch SDAR CPT/SFT for the Qwen3 family with a recommended parallel layout, or print the command.

    python examples/launch.py --model qwen3-8b --stage cpt --nodes 2 --dry-run \\
        --init-from ckpt/qwen3-8b --data-path data/corpus_text_document --save runs/qwen3-8b-cpt
    python examples/launch.py --model qwen3-30b-a3b --stage sft --nodes 4 --print-args ...   # for sbatch
    # fine-tune a released SDAR checkpoint (converted with tools/convert_hf_to_mcore.py
    # --hf-dir SDAR-30B-A3B-Chat --save ckpt/sdar-30b-a3b --expert-model-parallel-size 8)
    python examples/launch.py --model qwen3-30b-a3b --stage sft --nodes 4 --init-from ckpt/sdar-30b-a3b \\
        --data-path data/chat_sft --save runs/sdar-30b-a3b-sft
    # CPT with the block size warmed up from 1 and the joint AR + diffusion loss
    python examples/launch.py --model qwen3-8b --stage cpt --nodes 2 --recipe wsd-ar --dry-run \\
        --init-from ckpt/qwen3-8b --data-path data/corpus_text_document --save runs/qwen3-8b-cpt-ar
    python examples/launch.py --list-recipes
    # long windows with context parallelism: L = 16384 (2L = 32768 tokens per sample) on one node
    python examples/launch.py --model qwen3-8b --stage cpt --nodes 1 --seq-length 16384 --dry-run \
        --init-from ckpt/qwen3-8b --data-path data/corpus_text_document --save runs/qwen3-8b-cpt-16k

The recipe follows the paper: CPT with block size 4 on 4096-token windows, SFT on packed chat
windows (block size 4 by default; 4-64 supported). Each model has a layout per node count (tensor,
pipeline, expert parallelism, sequence parallelism, recompute) and the per-GPU memory Megatron's
theoretical estimator gives for it (weights, optimizer, activations over the 2L processed tokens).

Resume is automatic: when ``--save`` already holds a checkpoint the run continues from it (so a
requeued SLURM job picks up where it stopped); otherwise it starts from ``--init-from`` (a
checkpoint written by ``tools/convert_hf_to_mcore.py``) with ``--finetune``, which must hold a
checkpoint by then (refused before launching otherwise, dry runs included).

``--recipe`` picks the training recipe (``--list-recipes`` lists them): ``released`` (the default) is
the paper's, with a fixed block size; ``wsd`` trains with a block size that changes with the iteration
(``--sdar-block-size-schedule``), warming up from 1 (AR, what a Qwen3 checkpoint already does)
through the powers of two dividing the block size, each stage twice as long as the one before,
reaching the block size after 15% of the iterations and keeping it (CPT: 10000 iterations at B=4
give ``1:0,2:500,4:1500``); ``wsd-ar`` (CPT) adds the joint AR + diffusion loss to that schedule
(``--sdar-ar-loss-weight 0.5`` with the token-causal clean attention it needs), for one checkpoint
that decodes by blocks and token by token. ``--block-size-schedule`` overrides the recipe's schedule:
``wsd``, or an explicit ``B:ITER,...`` (e.g. ``1:0,4:2000,32:6000,8:9000``, which decays to 8 at the
end) that is passed through, its last block size becoming ``--sdar-block-size``. ``--extra`` comes
last and wins over any flag the recipe sets (e.g. ``--extra "--sdar-ar-loss-weight 1.0"``).

``--seq-length`` above 4096 picks the model's long-window layouts when it has them (Qwen3-8B and
Qwen3-30B-A3B, for L up to 16384 and up to 32768): context parallelism (``--context-parallel-size``)
splits the 2L sequence over CP ranks (each holds 2L / CP tokens, the matching zig-zag chunks of both
halves) and every layer all-gathers the clean half's keys and values (L tokens) and the noised ones
within a block of each rank's chunks over them; TP x CP stays inside a node. The global batch
keeps the stage's tokens per step (CPT: 64 windows of 16384, 32 of 32768). The dry run prints the
per-GPU estimate, what CP holds per GPU, and the bytes a GPU receives per layer from CP's K/V
all-gather against TP's collectives. CP needs the SDAR objective, a ``--seq-length`` that is a
multiple of 2 x CP, and the flex (or auto) attention back end; those are checked here, before
anything starts (``--extra "--context-parallel-size 1"`` turns CP off).

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
        # long windows: TP x CP = 8 inside a node (NVLink), data parallelism across nodes; at L = 16384
        # the activations of all 36 layers fit beside the weights, so no recompute (faster)
        long_layouts={
            16384: {n: dict(tp=2, cp=4, mbs=1, recompute="none") for n in (1, 2)},
            32768: {n: dict(tp=2, cp=4, mbs=1) for n in (1, 2)},
        },
    ),
    "qwen3-30b-a3b": dict(
        arch=["--num-layers", "48", "--hidden-size", "2048", "--num-attention-heads", "32",
              "--num-query-groups", "4", "--ffn-hidden-size", "6144", "--untie-embeddings-and-output-weights",
              "--num-experts", "128", "--moe-ffn-hidden-size", "768", "--moe-router-topk", "8",
              "--moe-router-load-balancing-type", "aux_loss", "--moe-aux-loss-coeff", "0.001",
              "--moe-token-dispatcher-type", "alltoall"],
        layouts={1: dict(tp=1, pp=2, ep=4, mbs=1), 2: dict(tp=1, pp=2, ep=8, mbs=1),
                 4: dict(tp=1, pp=1, ep=8, mbs=1)}, tied=False,
        # long windows: attention on TP 2 x CP 4 inside a node, the experts on EP 8 (expert TP 1) inside
        # a node, data parallelism across nodes; full recompute. One node only at L = 16384: there the
        # experts have no data-parallel copy to shard their optimizer state over (67 GB per GPU of
        # weights and optimizer state), and L = 32768 would leave under 6 GB for everything else
        long_layouts={
            16384: {n: dict(tp=2, cp=4, ep=8, etp=1, mbs=1) for n in (1, 2, 4)},
            32768: {n: dict(tp=2, cp=4, ep=8, etp=1, mbs=1) for n in (2, 4)},
        },
        long_nodes_why="on one node its experts have no data-parallel copy to shard their optimizer state "
        "over (67 GB per GPU of weights and optimizer state before any activation)",
    ),
}  # fmt: skip
DEFAULT_MASK_TOKEN_ID = 151669  # Qwen3's first unused vocabulary row
SHORT_WINDOW = 4096  # the stages' window; a model's ``layouts`` are for windows up to it
GPU_MEMORY_GB = 80  # what the layouts are sized for (A100 / H100 80 GB)
STAGES = {
    "cpt": dict(seq=4096, block=4, lr=1e-5, min_lr=1e-6, gbs=256, iters=10000, decay="cosine"),
    "sft": dict(seq=4096, block=4, lr=1e-5, min_lr=1e-5, gbs=128, iters=3000, decay="constant"),
}

AR_LOSS_WEIGHT = 0.5  # the joint loss's W in the wsd-ar recipe (the README's CPU learning runs used it)
RECIPES = {
    "released": dict(
        stages=("cpt", "sft"), schedule=None, flags=[],
        about="the paper's recipe: a fixed block size",
    ),
    "wsd": dict(
        stages=("cpt", "sft"), schedule="wsd", flags=[],
        about="block size warmed up from 1 (AR) by doubling to the block size over the first 15% of the "
        "iterations, then kept (--sdar-block-size-schedule)",
    ),
    "wsd-ar": dict(
        stages=("cpt",), schedule="wsd",
        flags=["--sdar-ar-loss-weight", str(AR_LOSS_WEIGHT), "--sdar-clean-attention", "causal"],
        about=f"wsd plus the joint AR + diffusion loss (--sdar-ar-loss-weight {AR_LOSS_WEIGHT} on the "
        "clean half, which needs --sdar-clean-attention causal): one checkpoint that decodes by blocks "
        "(tools/generate.py reads the clean attention from the export) and token by token (--mode ar)",
    ),
}  # fmt: skip


def recipes_text() -> str:
    """Each recipe, the stages it is for and what it does (``--help``'s epilog, ``--list-recipes``)."""
    import textwrap

    lines = ["recipes (--recipe NAME):"]
    for name, recipe in RECIPES.items():
        text = f"{name:<9} [{'/'.join(recipe['stages'])}] {recipe['about']}"
        lines += textwrap.wrap(text, 98, initial_indent="  ", subsequent_indent=" " * 12)
    return "\n".join(lines)


class ListRecipes(argparse.Action):
    """``--list-recipes``: print the recipes and exit (no other argument needed, like ``--help``)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(recipes_text())
        parser.exit()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=recipes_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
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
    p.add_argument(
        "--seq-length", type=int, default=None,
        help=f"the window L (default: the stage's, {SHORT_WINDOW}); longer windows use the model's "
        "context-parallel layouts where it has them (qwen3-8b, qwen3-30b-a3b: 16384, 32768)",
    )  # fmt: skip
    p.add_argument(
        "--block-size", type=int, default=None,
        help="default: the one --init-from's sdar_architecture.json records, else the stage's (4)",
    )  # fmt: skip
    p.add_argument(
        "--recipe", choices=list(RECIPES), default="released",
        help="the training recipe (default: released; listed below and by --list-recipes)",
    )  # fmt: skip
    p.add_argument("--list-recipes", action=ListRecipes, help="list the recipes and exit")
    p.add_argument(
        "--block-size-schedule", default=None, metavar="wsd|B:ITER,...",
        help="block size by iteration: 'wsd' (from 1 by doubling to the block size over the first 15%% of "
        "iterations) or an explicit schedule ending on the block size (default: the recipe's; the "
        "released recipe has none, a fixed block size)",
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


def window_of(args: argparse.Namespace) -> int:
    """The window L the run trains on: ``--seq-length`` (one in ``--extra`` wins, as it does for
    Megatron), else the stage's."""
    extra = last_value(shlex.split(args.extra), "--seq-length")
    return int(extra or args.seq_length or STAGES[args.stage]["seq"])


def layout_table(model: str, seq: int) -> tuple[int, dict]:
    """``(window, layouts by node count)`` for an L-token window: the model's layouts for the
    smallest window listed that holds ``seq`` (``SHORT_WINDOW``: the stage's ``layouts``; longer ones:
    ``long_layouts``, with context parallelism), the longest listed when none does."""
    tables = {SHORT_WINDOW: MODELS[model]["layouts"], **MODELS[model].get("long_layouts", {})}
    holding = [window for window in tables if window >= seq]
    window = min(holding) if holding else max(tables)
    return window, tables[window]


def layout_for(model: str, nodes: int, seq: int = SHORT_WINDOW) -> dict:
    """The layout for ``nodes`` nodes and an L = ``seq`` window (the one listed for the most nodes
    up to ``nodes``), with its defaults filled in: no PP, EP or CP, full recompute, and the global
    batch of the stage scaled to keep its tokens per step (``gbs_scale``)."""
    window, layouts = layout_table(model, seq)
    fitting = [n for n in layouts if n <= nodes]
    if not fitting:
        if window == SHORT_WINDOW:
            raise SystemExit(f"error: {model} needs at least {min(layouts)} node(s)")
        why = MODELS[model].get("long_nodes_why")
        raise SystemExit(
            f"error: {model} at --seq-length {seq} (2L = {2 * seq} tokens) needs at least {min(layouts)} "
            f"node(s)" + (f": {why}" if why else "") + f"; its layouts for that window are for "
            f"{', '.join(str(n) for n in sorted(layouts))} node(s)"
        )
    layout = {"pp": 1, "ep": 1, "cp": 1, "recompute": "full", "window": window, **layouts[max(fitting)]}
    layout["gbs_scale"] = SHORT_WINDOW / window  # a long window: fewer windows, same tokens per step
    return layout


def global_batch_size(args: argparse.Namespace, lay: dict) -> int:
    """``--global-batch-size``, else the stage's, in windows of the layout's length (256 windows of
    4096 tokens for CPT become 64 of 16384: the same tokens per step)."""
    return args.global_batch_size or max(1, round(STAGES[args.stage]["gbs"] * lay["gbs_scale"]))


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
    lay = layout_for(args.model, nodes, window_of(args))
    return [
        *MODELS[args.model]["arch"], *parallel_flags(lay), "--micro-batch-size", str(lay["mbs"]),
        "--global-batch-size", str(global_batch_size(args, lay)), *shlex.split(args.extra),
    ]  # fmt: skip


def parallel_flags(lay: dict) -> list[str]:
    """Megatron's flags for a layout's model parallelism (CP and expert TP only when set)."""
    out = ["--tensor-model-parallel-size", str(lay["tp"]), "--pipeline-model-parallel-size", str(lay["pp"]),
           "--expert-model-parallel-size", str(lay["ep"])]  # fmt: skip
    if lay["cp"] > 1:
        out += ["--context-parallel-size", str(lay["cp"])]
    if "etp" in lay:
        out += ["--expert-tensor-parallel-size", str(lay["etp"])]
    return out


def recompute_flags(lay: dict) -> list[str]:
    """Full recompute of every layer (only each layer's input is kept), or none."""
    if lay["recompute"] == "none":
        return []
    return ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]


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


def layout_text(flags: list[str]) -> str:
    """``TP=2 PP=1 EP=1`` (and ``CP=4`` under context parallelism) as ``flags`` set them."""
    sizes = [(name, last_value(flags, f"--{flag}-parallel-size", "1"))
             for name, flag in (("TP", "tensor-model"), ("PP", "pipeline-model"), ("EP", "expert-model"),
                                ("CP", "context"))]  # fmt: skip
    return " ".join(f"{name}={value}" for name, value in sizes if name != "CP" or value != "1")


def check_layout(args: argparse.Namespace) -> None:
    """Refuse, before Megatron asserts on it, a layout that does not fit ``--nodes`` x
    ``--gpus-per-node``; name node counts where the recipe's layout does fit."""
    flags = layout_flags(args, args.nodes)
    problems = layout_problems(flags, args.nodes, args.gpus_per_node)
    if not problems:
        return
    first = min(layout_table(args.model, window_of(args))[1])
    near = sorted(range(first, max(4 * args.nodes, 8) + 1), key=lambda n: (abs(n - args.nodes), n))
    fits = [n for n in near if n != args.nodes
            and not layout_problems(layout_flags(args, n), n, args.gpus_per_node)][:2]  # fmt: skip
    hint = f"\n(or use --nodes {' or '.join(str(n) for n in sorted(fits))}, where it fits)" if fits else ""
    sizes = layout_text(flags)
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


def check_recipe(args: argparse.Namespace) -> None:
    """Refuse a recipe on a stage it is not for."""
    stages = RECIPES[args.recipe]["stages"]
    if args.stage not in stages:
        others = [name for name, r in RECIPES.items() if args.stage in r["stages"]]
        raise SystemExit(
            f"error: --recipe {args.recipe} is for --stage {' or '.join(stages)}, not {args.stage} "
            f"(recipes for {args.stage}: {', '.join(others)}; --list-recipes describes them)"
        )


def block_size_schedule(args: argparse.Namespace, block: int, iters: int):
    """The block-size schedule asked for, ``--block-size-schedule`` or else the recipe's (``None``
    without one): ``wsd`` warms up to ``block`` over ``iters`` iterations; an explicit schedule must
    end on ``--block-size`` when that is given."""
    text = args.block_size_schedule or RECIPES[args.recipe]["schedule"]
    if text is None:
        return None
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from megatron_sdar.schedule import BlockSizeSchedule, warmup_schedule

    try:
        if text == "wsd":
            return warmup_schedule(block, iters)
        schedule = BlockSizeSchedule.parse(text)
    except ValueError as err:
        where = f"--block-size-schedule {text!r}" if args.block_size_schedule else f"--recipe {args.recipe}"
        raise SystemExit(f"error: {where}: {err}") from None
    if args.block_size is not None and args.block_size != schedule.final:
        raise SystemExit(
            f"error: --block-size-schedule ends at block size {schedule.final} but --block-size is "
            f"{args.block_size}: the schedule ends on the block size the model is decoded with (drop "
            "--block-size, or end the schedule on it)"
        )
    return schedule


def pretrain_args(args: argparse.Namespace) -> list[str]:
    model, stage = MODELS[args.model], STAGES[args.stage]
    check_recipe(args)
    arch = recorded_architecture(args.init_from)
    if arch is not None:
        check_init_architecture(args, arch)
    recorded_block = arch.block_size if arch is not None else None
    recorded_mask = arch.mask_token_id if arch is not None else None
    seq = window_of(args)
    lay = layout_for(args.model, args.nodes, seq)
    check_layout(args)
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
        *parallel_flags(lay), "--seq-length", str(seq), "--micro-batch-size", str(lay["mbs"]),
        "--global-batch-size", str(global_batch_size(args, lay)),
        "--train-iters", str(iters), "--lr", str(args.lr or stage["lr"]), "--min-lr", str(stage["min_lr"]),
        "--lr-decay-style", stage["decay"], "--lr-warmup-fraction", "0.03", "--weight-decay", "0.1",
        "--clip-grad", "1.0", "--adam-beta2", "0.95", "--bf16", "--use-distributed-optimizer",
        "--overlap-grad-reduce", "--overlap-param-gather", "--calculate-per-token-loss",
        *recompute_flags(lay), "--transformer-impl", "transformer_engine", "--cross-entropy-loss-fusion",
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
    out += RECIPES[args.recipe]["flags"]
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
    out += shlex.split(args.extra)
    problems = context_parallel_problems(out)
    if len(problems) == 1:
        raise SystemExit(f"error: {problems[0]}")
    if problems:
        raise SystemExit("error: context parallelism:\n  - " + "\n  - ".join(problems))
    return out


def context_parallel_problems(flags: list[str]) -> list[str]:
    """What the SDAR checks (``megatron_sdar.training.arguments.context_parallel_problems``) would
    refuse in ``flags`` under ``--context-parallel-size`` > 1, said before anything starts, each
    naming the number or flag to change."""
    cp = int(last_value(flags, "--context-parallel-size", "1"))
    if cp == 1:
        return []
    seq = int(last_value(flags, "--seq-length", str(SHORT_WINDOW)))
    problems = []
    if seq % (2 * cp):
        lower = seq - seq % (2 * cp)
        sizes = " or ".join(str(v) for v in (lower, lower + 2 * cp) if v > 0)
        problems.append(
            f"--seq-length {seq} does not split over --context-parallel-size {cp}: the window is cut into "
            f"2 x CP = {2 * cp} equal chunks (two per rank, zig-zag), so --seq-length must be a multiple "
            f"of {2 * cp}: use --seq-length {sizes} (or a CP whose double divides {seq})"
        )
    if last_value(flags, "--sdar-objective", "sdar") != "sdar":
        problems.append(
            f"--sdar-objective {last_value(flags, '--sdar-objective')} with --context-parallel-size {cp}: "
            "context parallelism splits the SDAR objective's [x_t ; x_0] sequence and the AR baseline runs "
            "without it; add --context-parallel-size 1 to --extra (the layout for this window sets "
            f"CP={cp}), or train the SDAR objective"
        )
    if last_value(flags, "--sdar-attention-backend", "auto") == "split":
        problems.append(f"--sdar-attention-backend split does not support context parallelism: use flex "
                        f"(or auto) with --context-parallel-size {cp}")  # fmt: skip
    if last_value(flags, "--cp-comm-type", "p2p") not in ("p2p", "all_gather"):
        problems.append(f"--cp-comm-type {last_value(flags, '--cp-comm-type')}: SDAR attention all-gathers "
                        "keys and values over the context-parallel group; pass all_gather or leave the "
                        "default (p2p)")  # fmt: skip
    return problems


GB = 1024**3  # the estimates' unit (GiB)


def activation_memory(
    *,
    seq: int,
    mbs: int,
    hidden: int,
    ffn: int,
    layers: int,
    pp: int = 1,
    tp: int = 1,
    cp: int = 1,
    sequence_parallel: bool = False,
    query_groups: int,
    head_dim: int,
    vocab: int,
    recompute: str = "full",
    halves: int = 1,
    topk: int = 0,
) -> dict:
    """Activation bytes per GPU on the first pipeline stage for an L = ``seq`` window, by part.

    Each GPU holds ``2L x mbs / CP`` tokens of ``[x_t ; x_0]`` (its two zig-zag chunks of both
    halves), split again by TP under sequence parallelism. A layer's working set is Megatron's
    per-layer formula (``18 + 4 ffn / h`` bytes per token and hidden unit, no attention-score term:
    the flex kernel keeps none) plus, for MoE, the ``topk`` copies of each routed token (the experts'
    inputs and outputs, ``4 topk``). Under context parallelism each layer's queries attend bf16 keys
    and values of ``L + L / CP`` tokens (``kv_groups / TP x head_dim`` wide): the clean half's, all
    gathered, and the GPU's own noised ones (the few noised keys exchanged at chunk edges, at most
    ``4 (B - 1) (CP - 1)``, are left out), which no split shrinks:

    * ``recompute="full"`` (what the recipes set unless a layout says ``none``): every layer's bf16
      input is kept (``layers``, for each of the PP micro-batches in flight under 1F1B) and one layer
      is recomputed at a time, so its working set and its gathered K/V are transient: one layer's
      gathered K/V plus, in its backward, their gradients before the reduce-scatter (2 x the K/V).
    * ``recompute="none"``: every layer's working set and every layer's gathered K/V are held for the
      backward (times the micro-batches in flight), plus one layer's K/V gradients.

    The output layer's fp32 logits and their gradient cover this GPU's noised tokens (and its clean
    tokens under the joint AR loss, ``halves=2``), vocabulary-split by TP.
    """
    tokens = 2 * seq * mbs / cp  # this GPU's share of [x_t ; x_0]
    sp = tp if sequence_parallel else 1
    here = layers // pp
    per_token = 18 + 4 * ffn / hidden + 4 * topk
    if sequence_parallel:
        layer = tokens * hidden * per_token / tp
    else:  # the norms' inputs and the residual stream are whole on every TP rank
        layer = tokens * hidden * (10 + (per_token - 10) / tp)
    kv = 2 * (seq * mbs * (1 + 1 / cp)) * max(1.0, query_groups / tp) * head_dim * 2 if cp > 1 else 0.0
    if recompute == "full":
        kept = here * tokens * hidden * 2 / sp
        layers_bytes, kv_bytes = kept * pp + layer, 2 * kv
    elif recompute == "none":
        layers_bytes, kv_bytes = here * layer * pp, (here * pp + 1) * kv
    else:
        raise ValueError(f"recompute is 'full' or 'none', got {recompute!r}")
    logits = 2 * halves * (tokens / 2) * (vocab / tp) * 4
    return {"layers": layers_bytes, "kv_gather": kv_bytes, "logits": logits,
            "total": layers_bytes + kv_bytes + logits}  # fmt: skip


def communication_per_layer(
    *, seq: int, mbs: int, hidden: int, tp: int, cp: int, query_groups: int, head_dim: int
) -> dict:
    """Bytes each GPU receives per layer in the forward (the backward moves as much again): the CP
    all-gather of the other ranks' bf16 clean keys and values (``(CP-1)/CP x L x 2 x kv_groups/TP x
    head_dim x 2``, plus at most ``4 (B - 1)`` noised edge tokens per other rank, left out; the
    backward reduce-scatters their gradients), and TP's two
    all-gathers and two reduce-scatters of the ``2L / CP`` token activations under sequence
    parallelism (the same volume as its two all-reduces without it)."""
    kv = 2 * (seq * mbs) * max(1.0, query_groups / tp) * head_dim * 2
    tokens = 2 * seq * mbs / cp
    return {"cp_kv_all_gather": (cp - 1) / cp * kv, "tp": 4 * (tp - 1) / tp * tokens * hidden * 2}


def megatron_args(args: argparse.Namespace, flags: list[str]) -> argparse.Namespace:
    """``flags`` as Megatron parses and validates them for ``--nodes x --gpus-per-node`` GPUs, with
    ``data_parallel_size`` set to the data-parallel size *with* context parallelism (``DP x CP``): the
    group Megatron's distributed optimizer shards the dense parameters' state over. The validation's
    probe of the local GPU (for TP or CP > 1) is answered as a Hopper, which needs
    ``CUDA_DEVICE_MAX_CONNECTIONS=1`` as the launch scripts set it."""
    import contextlib
    import io

    sys.path.insert(0, ROOT)
    from megatron_sdar import compat

    compat.ignore_known_warnings()  # the megatron-core / torch notices named there, nothing else
    import megatron.training.arguments as megatron_arguments

    import pretrain_sdar

    saved = sys.argv, dict(os.environ), megatron_arguments.get_device_arch_version
    world = args.nodes * args.gpus_per_node
    os.environ.update(WORLD_SIZE=str(world), RANK="0", CUDA_DEVICE_MAX_CONNECTIONS="1")
    sys.argv = ["pretrain_sdar.py", *[f for f in flags if f != "--finetune"]]
    megatron_arguments.get_device_arch_version = lambda: 9
    try:
        parsed = megatron_arguments.parse_args(pretrain_sdar._extra_args)
        parsed.padded_vocab_size = 151936
        with contextlib.redirect_stdout(io.StringIO()):
            megatron_arguments.validate_args(parsed, {})
    finally:
        sys.argv = saved[0]
        os.environ.clear()
        os.environ.update(saved[1])
        megatron_arguments.get_device_arch_version = saved[2]
    parsed.data_parallel_size *= parsed.context_parallel_size  # DP x CP
    return parsed


def memory_estimate(args: argparse.Namespace, flags: list[str]) -> dict:
    """Per-GPU memory (GB) on the first pipeline stage.

    Weights, gradients and optimizer state come from Megatron's theoretical estimator: the weights
    are split by TP, PP and (experts) EP x expert TP, never by CP; the distributed optimizer shards
    the fp32 state of the dense weights over DP x CP (Megatron's data-parallel group with context
    parallelism) and that of the experts over the expert data-parallel group. Activations are
    :func:`activation_memory`'s for what SDAR runs, 2L tokens per sample, with the recompute the
    flags set (``--recompute-granularity full``, else none). Also returns
    :func:`communication_per_layer`'s figures.
    """
    from megatron.training.theoretical_memory_usage import compute_weight_and_optimizer_memory

    parsed = megatron_args(args, flags)
    weights = compute_weight_and_optimizer_memory(parsed)
    tp, cp = parsed.tensor_model_parallel_size, parsed.context_parallel_size
    recompute = "full" if last_value(flags, "--recompute-granularity") == "full" else "none"
    shape = dict(seq=parsed.seq_length, mbs=parsed.micro_batch_size, hidden=parsed.hidden_size,
                 query_groups=parsed.num_query_groups, head_dim=parsed.kv_channels)  # fmt: skip
    topk = parsed.moe_router_topk if parsed.num_experts else 0
    ffn = parsed.moe_ffn_hidden_size * topk if parsed.num_experts else parsed.ffn_hidden_size
    halves = 2 if getattr(parsed, "sdar_ar_loss_weight", 0.0) else 1  # the AR loss scores x_0 too
    act = activation_memory(**shape, ffn=ffn, layers=parsed.num_layers,
                            pp=parsed.pipeline_model_parallel_size, tp=tp, cp=cp,
                            sequence_parallel="--sequence-parallel" in flags, vocab=parsed.padded_vocab_size,
                            recompute=recompute, halves=halves, topk=topk)  # fmt: skip
    comm = communication_per_layer(**shape, tp=tp, cp=cp)
    return {"weights_and_optimizer_gb": weights / GB, "activations_gb": act["total"] / GB,
            "kv_gather_gb": act["kv_gather"] / GB, "logits_gb": act["logits"] / GB,
            "total_gb": (weights + act["total"]) / GB, "recompute": recompute,
            "tokens_per_gpu": 2 * parsed.seq_length * parsed.micro_batch_size // cp,
            "cp_kv_all_gather_mb": comm["cp_kv_all_gather"] / 1024**2,
            "tp_mb": comm["tp"] / 1024**2}  # fmt: skip


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
    cp = int(last_value(flags, "--context-parallel-size", "1"))
    print(f"# {args.model} {args.stage} on {args.nodes} x {args.gpus_per_node} GPUs: {layout_text(flags)}; "
          f"estimated {memory['total_gb']:.1f} GB per GPU "
          f"({memory['weights_and_optimizer_gb']:.1f} weights+optimizer, "
          f"{memory['activations_gb']:.1f} activations)")  # fmt: skip
    if memory["total_gb"] > GPU_MEMORY_GB:
        print(f"# warning: the estimate exceeds {GPU_MEMORY_GB} GB per GPU; use more nodes, a layout with "
              "more parallelism, or a shorter --seq-length")  # fmt: skip
    if cp > 1:
        seq = int(last_value(flags, "--seq-length"))
        recompute = "full" if memory["recompute"] == "full" else "no"
        print(f"# context parallelism: CP={cp} splits the 2L = {2 * seq}-token sequence into "
              f"{memory['tokens_per_gpu']} tokens per GPU; {recompute} recompute, "
              f"{memory['kv_gather_gb']:.2f} GB of gathered K/V ("
              + ("one layer at a time" if memory["recompute"] == "full" else "every layer's, held for "
                 "backward") + f"), {memory['logits_gb']:.1f} GB of logits")  # fmt: skip
        print(f"# communication per layer per GPU (forward; the backward as much again): CP K/V all-gather "
              f"{memory['cp_kv_all_gather_mb']:.0f} MB received vs TP all-gather/reduce-scatter "
              f"{memory['tp_mb']:.0f} MB")  # fmt: skip
    if last_value(flags, "--sdar-block-size-schedule") is not None or args.recipe != "released":
        schedule = last_value(flags, "--sdar-block-size-schedule")
        weight = float(last_value(flags, "--sdar-ar-loss-weight", "0"))
        print(f"# recipe {args.recipe}: "
              + (f"block size schedule {schedule}" if schedule else "fixed block size")
              + (f", joint AR loss weight {weight:g}" if weight else ""))  # fmt: skip
    print(shlex.join(cmd))
    if not args.dry_run:
        split = [int(last_value(flags, f"--{n}-parallel-size", "1")) for n in ("tensor-model", "context")]
        if max(split) > 1:  # Megatron asserts it for TP or CP (before Blackwell); the scripts export it too
            os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        os.execvp(cmd[0], cmd)
    return {"command": cmd, "memory": memory}


if __name__ == "__main__":
    main()
