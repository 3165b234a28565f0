"""The ``--sdar-*`` argument group and the checks that refuse settings a run cannot start with: SDAR
settings, a checkpoint named to start from that is not there, logging that would write nothing."""

from __future__ import annotations

import argparse
import functools
import json
import os

from megatron_sdar.config import ATTENTION_BACKENDS, DocumentMask, LossNormalizer, PositionIds, SDARConfig
from megatron_sdar.context_parallel import cp_problems
from megatron_sdar.masks import BlockCounting, CleanAttention
from megatron_sdar.noise import EmptyRows, NoiseUnit
from megatron_sdar.schedule import schedule_problems

OBJECTIVES = ("sdar", "ar")

STAGES = ("cpt", "sft")

OUTPUT_POSITIONS = ("masked", "noised")


def add_sdar_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``--sdar-*`` flags (Megatron's extra-args provider)."""
    g = parser.add_argument_group("SDAR", "block-diffusion objective")
    g.add_argument(
        "--sdar-objective",
        choices=OBJECTIVES,
        default="sdar",
        help="sdar: block diffusion over [x_t; x_0]; ar: the same model as a causal LM",
    )
    g.add_argument(
        "--sdar-stage",
        choices=STAGES,
        default="cpt",
        help="cpt: GPTDataset windows, every real token eligible; sft: packed chat windows "
        "from tools/preprocess_sft.py, response tokens eligible",
    )
    g.add_argument("--sdar-block-size", type=int, default=4, help="block size B; must divide --seq-length")
    g.add_argument(
        "--sdar-block-size-schedule",
        default=None,
        metavar="B:ITER,...",
        help="block size by training iteration, piecewise constant, e.g. '1:0,4:2000,32:6000,8:9000' "
        "(B=1 from iteration 0, 4 from 2000, ...; ITER counts completed iterations, so Megatron logs "
        "the first step of B:N as iteration N+1). Starts at 0 and ends on --sdar-block-size (the "
        "decoding block size, used for validation and test); every B divides --seq-length; SFT data "
        "must be preprocessed with the largest B. Recorded in checkpoints: a resume must give the same",
    )
    g.add_argument(
        "--sdar-mask-token-id",
        type=int,
        default=None,
        help="id of the mask token (Qwen3: 151669); must be inside the vocabulary and "
        "never occur in the data",
    )
    g.add_argument("--sdar-noise-eps", type=float, default=1e-3, help="p = (1 - eps) t + eps")
    g.add_argument(
        "--sdar-noise-unit",
        choices=[u.value for u in NoiseUnit],
        default="document",
        help="draw t once per document (default) or once per block",
    )
    g.add_argument(
        "--sdar-noise-range",
        type=float,
        nargs=2,
        metavar=("T_MIN", "T_MAX"),
        default=(0.0, 1.0),
        help="draw t uniformly in [T_MIN, T_MAX] (default 0 1; the released LLaDA2 SFT code uses 0.3 0.8)",
    )
    g.add_argument(
        "--sdar-empty-rows",
        choices=[e.value for e in EmptyRows],
        default="redraw",
        help="a row that draws no masked token: redraw its t and masks (up to 10 tries) with loss weights "
        "conditioned on the row having one, so the expected weight per eligible token stays 1 "
        "(default); force: one forced token keeping its small p, as before (over-weights small rows)",
    )
    g.add_argument(
        "--sdar-document-mask",
        choices=[d.value for d in DocumentMask],
        default="separate",
        help="separate (default): attention never crosses the documents packed into a window; "
        "global: the paper's CPT mask, 'a global block-wise attention mask' over the whole window "
        "(attention across documents, blocks counted from the window start; noise still per "
        "document); CPT only",
    )
    g.add_argument(
        "--sdar-complementary-masks",
        action="store_true",
        help="every window appears twice in a micro-batch (consecutive rows), the second with the "
        "complementary mask, so each eligible token is supervised exactly once per pair; needs an "
        "even --micro-batch-size; data tokens/s counts each window once",
    )
    g.add_argument("--sdar-loss-normalizer", choices=[n.value for n in LossNormalizer], default="eligible")
    g.add_argument(
        "--sdar-clean-attention", choices=[c.value for c in CleanAttention], default="block_causal"
    )
    g.add_argument("--sdar-block-counting", choices=[c.value for c in BlockCounting], default="document")
    g.add_argument(
        "--sdar-position-ids",
        choices=[p.value for p in PositionIds],
        default=None,
        help="continuous (CPT default) or restart per document (SFT default)",
    )
    g.add_argument(
        "--sdar-attention-backend",
        choices=ATTENTION_BACKENDS,
        default="auto",
        help="auto: flex on CUDA, sdpa on CPU; split: variable-length flash attention plus a local "
        "band (CUDA, bf16/fp16); see docs/performance.md",
    )
    g.add_argument(
        "--sdar-flex-kernel-options",
        type=json_object,
        default=None,
        help="FlexAttention kernel options as JSON (default: tuned tiles on Hopper at head dim 128, "
        "FlexAttention's own elsewhere; '{}' for FlexAttention's own everywhere); "
        "benchmarks/attention.py --sweep measures candidates",
    )
    g.add_argument(
        "--sdar-output-positions",
        choices=OUTPUT_POSITIONS,
        default="masked",
        help="where the output layer and cross-entropy run: masked (only the masked noised tokens, "
        "about half; the index is built on the host) or noised (the whole noised half); same loss "
        "and gradients",
    )
    g.add_argument(
        "--sdar-ar-loss-weight",
        type=float,
        default=0.0,
        metavar="W",
        help="add W times a next-token loss on the clean half x_0 to the diffusion loss (0 = off); "
        "needs --sdar-clean-attention causal (block-causal would show each clean token its target); "
        "logs 'diffusion loss' and 'ar loss' beside 'lm loss', their total; the output layer then also "
        "runs on the clean half (on its positions with a target under --sdar-output-positions masked)",
    )
    g.add_argument(
        "--sdar-mask-embedding-noise-std",
        type=float,
        default=0.0,
        metavar="STD",
        help="add N(0, STD^2) noise to the embedding output at masked positions during the first "
        "--sdar-mask-embedding-noise-iters iterations (LLaDA2.0's remedy for early gradient spikes "
        "while the new mask token's embedding is untrained); 0 = off. Seeded by --seed, iteration, "
        "micro-batch and data-parallel rank: the same on every tensor-parallel rank, exact on resume",
    )
    g.add_argument(
        "--sdar-mask-embedding-noise-iters",
        type=int,
        default=0,
        metavar="N",
        help="the noise of --sdar-mask-embedding-noise-std applies while fewer than N iterations are "
        "completed",
    )
    g.add_argument(
        "--sdar-sft-pad-token-id",
        type=int,
        default=None,
        help="token that pads SFT windows (default: the tokenizer's end-of-document token)",
    )
    return parser  # fmt: skip


def json_object(text: str) -> dict:
    """argparse type: a JSON object (an error that says what is wrong otherwise)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"BLOCK_M\": 64}}', got {text!r}")
    return value


def sdar_config_from_args(args: argparse.Namespace) -> SDARConfig:
    positions = args.sdar_position_ids or ("document" if args.sdar_stage == "sft" else "continuous")
    return SDARConfig(
        block_size=args.sdar_block_size,
        mask_token_id=-1 if args.sdar_mask_token_id is None else args.sdar_mask_token_id,
        noise_eps=args.sdar_noise_eps,
        noise_unit=args.sdar_noise_unit,
        noise_range=tuple(getattr(args, "sdar_noise_range", (0.0, 1.0))),
        empty_rows=getattr(args, "sdar_empty_rows", "redraw"),
        document_mask=getattr(args, "sdar_document_mask", "separate"),
        complementary_masks=bool(getattr(args, "sdar_complementary_masks", False)),
        loss_normalizer=args.sdar_loss_normalizer,
        clean_attention=args.sdar_clean_attention,
        block_counting=args.sdar_block_counting,
        position_ids=positions,
        attention_backend=args.sdar_attention_backend,
        flex_kernel_options=getattr(args, "sdar_flex_kernel_options", None),
        ar_loss_weight=ar_loss_weight(args),
        largest_block_size=largest_block_size(args),
    )


def largest_block_size(args: argparse.Namespace) -> int:
    """``--sdar-block-size``, or the largest of ``--sdar-block-size-schedule`` (when it parses)."""
    return _largest_block_size(args.sdar_block_size, getattr(args, "sdar_block_size_schedule", None))


@functools.cache
def _largest_block_size(block_size: int, schedule: str | None) -> int:
    """Cached: the training step asks for it per micro-batch under context parallelism."""
    from megatron_sdar.schedule import BlockSizeSchedule

    if schedule:
        try:
            return max(BlockSizeSchedule.parse(schedule).largest, block_size)
        except ValueError:  # reported by schedule_problems
            pass
    return block_size


def ar_loss_weight(args: argparse.Namespace) -> float:
    """``--sdar-ar-loss-weight``: the weight of the clean half's next-token loss (0 = off)."""
    return float(getattr(args, "sdar_ar_loss_weight", 0.0) or 0.0)


def context_parallel_problems(args: argparse.Namespace) -> list[str]:
    """``--context-parallel-size`` settings SDAR training cannot run with."""
    cp = getattr(args, "context_parallel_size", 1)
    if getattr(args, "hybrid_context_parallel", False) and getattr(args, "sdar_objective", "sdar") == "sdar":
        return [
            "--hybrid-context-parallel balances packed THD sequences of varying length; SDAR windows "
            "have a fixed length and their own split: use --context-parallel-size alone"
        ]
    if cp == 1:
        return []
    problems = cp_problems(args.seq_length, cp, largest_block_size(args))
    if getattr(args, "sdar_objective", "sdar") != "sdar":
        problems.append(
            "--context-parallel-size > 1 splits the SDAR objective's [x_t ; x_0] sequence; the AR baseline "
            "(--sdar-objective ar) runs without context parallelism: use --context-parallel-size 1"
        )
    if getattr(args, "sdar_attention_backend", "auto") == "split":
        problems.append("--sdar-attention-backend split does not support context parallelism yet: use flex "
                        "(or auto) with --context-parallel-size > 1")  # fmt: skip
    comm = getattr(args, "cp_comm_type", None) or ["p2p"]
    comm = comm if isinstance(comm, list) else [comm]
    if any(c not in ("p2p", "all_gather") for c in comm):
        problems.append(
            f"--cp-comm-type {' '.join(comm)}: SDAR attention all-gathers keys and values over the "
            "context-parallel group (docs/context_parallel.md); pass all_gather or leave the default"
        )
    if getattr(args, "hierarchical_context_parallel_sizes", None):
        problems.append("--hierarchical-context-parallel-sizes is not supported by SDAR attention")
    return problems


def mask_embedding_noise(args: argparse.Namespace) -> tuple[float, int]:
    """``(std, iterations)`` of the mask-embedding noise (std 0: off)."""
    return (
        float(getattr(args, "sdar_mask_embedding_noise_std", 0.0) or 0.0),
        int(getattr(args, "sdar_mask_embedding_noise_iters", 0) or 0),
    )


def mask_embedding_noise_problems(args: argparse.Namespace) -> list[str]:
    """Mask-embedding noise settings that would do nothing or cannot apply."""
    std, iters = mask_embedding_noise(args)
    problems = []
    if std < 0:
        problems.append(f"--sdar-mask-embedding-noise-std must be >= 0 (0 = off), got {std}")
    if iters < 0:
        problems.append(f"--sdar-mask-embedding-noise-iters must be >= 0, got {iters}")
    if std > 0 and iters == 0:
        problems.append(
            f"--sdar-mask-embedding-noise-std {std} applies during the first "
            "--sdar-mask-embedding-noise-iters iterations, which is 0: pass the number of iterations"
        )
    if iters > 0 and std == 0:
        problems.append(
            f"--sdar-mask-embedding-noise-iters {iters} without --sdar-mask-embedding-noise-std: "
            "pass the noise's standard deviation (e.g. 0.1)"
        )
    if std > 0 and getattr(args, "sdar_objective", "sdar") != "sdar":
        problems.append("--sdar-mask-embedding-noise-std applies to the SDAR objective only (the AR "
                        "objective has no mask token)")  # fmt: skip
    return problems


def output_on_masked(args: argparse.Namespace) -> bool:
    """Whether ``--sdar-output-positions`` runs the output layer on the masked positions only."""
    return getattr(args, "sdar_output_positions", "masked") == "masked"


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


TRACKER_FILE = "latest_checkpointed_iteration.txt"  # Megatron's marker of a complete checkpoint


class SettingsError(ValueError):
    """Settings a run cannot start with: ``problems`` lists every one, each saying what to change."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__(describe_problems(self.problems))


def describe_problems(problems: list[str]) -> str:
    """One message listing ``problems`` (continuation lines of a problem stay under its bullet)."""
    items = ["  - " + problem.replace("\n", "\n    ") for problem in problems]
    return "\n".join([f"invalid settings ({len(problems)} to fix):", *items])


def _resumable_checkpoint(args: argparse.Namespace) -> bool:
    """Whether this run will restore optimizer state from ``--load``."""
    load = getattr(args, "load", None)
    if not load or getattr(args, "finetune", False) or getattr(args, "no_load_optim", False):
        return False
    return os.path.exists(os.path.join(load, TRACKER_FILE))


def holds_checkpoint(path: str, args: argparse.Namespace | None = None) -> bool:
    """Whether Megatron will find a checkpoint to load in ``path``: its tracker file, or a global
    non-persistent checkpoint. Places this process cannot look into (object stores, node-local
    non-persistent checkpoints) count as holding one; Megatron decides there."""
    if "://" in path:
        return True
    if os.path.isfile(os.path.join(path, TRACKER_FILE)):
        return True
    kind = getattr(args, "non_persistent_ckpt_type", None)
    if kind == "local":
        return True
    if kind == "global":
        folder = getattr(args, "non_persistent_global_ckpt_dir", None) or os.path.join(path, "non_persistent")
        return os.path.isfile(os.path.join(folder, TRACKER_FILE))
    return False


def _same_folder(a: str | None, b: str | None) -> bool:
    return bool(a and b) and os.path.realpath(a) == os.path.realpath(b)


def _why_empty(path: str) -> str:
    if not os.path.exists(path):
        return f"{path} does not exist"
    return f"{path} holds no Megatron checkpoint (no {TRACKER_FILE})"


_CONVERT_HINT = (
    "convert a HF model into it (tools/convert_hf_to_mcore.py --hf-dir MODEL --save DIR) or name the "
    "--save folder of an earlier run"
)


def start_checkpoint_problems(args: argparse.Namespace) -> list[str]:
    """Refuse to start from random weights when the flags name weights to start from.

    ``--finetune`` always needs a checkpoint in ``--load``; so does ``--pretrained-checkpoint`` (when
    ``--load`` holds none) and ``--exit-on-missing-checkpoint``. A plain ``--load`` that holds none
    starts fresh only when it is ``--save`` (the first run of a job that resumes on requeue, see
    :func:`fresh_start_notice`); any other empty ``--load`` is a wrong path.
    """
    load = getattr(args, "load", None)
    pretrained = getattr(args, "pretrained_checkpoint", None)
    if load and holds_checkpoint(load, args):
        return []
    if pretrained:
        if holds_checkpoint(pretrained):
            return []
        also = f" and --load {load} holds none either" if load else ""
        return [f"--pretrained-checkpoint {_why_empty(pretrained)}{also}: {_CONVERT_HINT}"]
    if not load:
        if getattr(args, "finetune", False):
            return ["--finetune starts from the weights in --load: pass --load DIR (a checkpoint written by "
                    "tools/convert_hf_to_mcore.py or by training)"]  # fmt: skip
        return []
    if getattr(args, "finetune", False):
        return [f"--finetune --load {load}: {_why_empty(load)}, so the run would start from random "
                f"weights; fix the path, or {_CONVERT_HINT}"]  # fmt: skip
    if getattr(args, "exit_on_missing_checkpoint", False):
        return [f"--exit-on-missing-checkpoint: {_why_empty(load)}"]
    if _same_folder(load, getattr(args, "save", None)):
        return []
    return [f"--load {load}: {_why_empty(load)}, and it is not --save, so there is nothing to resume. Fix "
            "the path; to start from converted weights add --finetune; for a run that starts fresh and "
            "resumes after a requeue pass the same folder to --load and --save"]  # fmt: skip


def fresh_start_notice(args: argparse.Namespace) -> str | None:
    """The line to print when ``--load`` is ``--save`` and holds no checkpoint yet (a fresh start)."""
    load = getattr(args, "load", None)
    if (
        load
        and not getattr(args, "finetune", False)
        and not getattr(args, "pretrained_checkpoint", None)
        and _same_folder(load, getattr(args, "save", None))
        and not holds_checkpoint(load, args)
    ):
        return f"no checkpoint in --load {load} yet: starting from random initial weights (first run)"
    return None


def logging_problems(args: argparse.Namespace) -> list[str]:
    """W&B settings that would log nothing."""
    if getattr(args, "wandb_project", None) and not getattr(args, "tensorboard_dir", None):
        return ["--wandb-project: megatron-core 0.19.2 logs to W&B only beside TensorBoard, so nothing "
                "would be logged: add --tensorboard-dir DIR"]  # fmt: skip
    return []


def validate_sdar_args(args: argparse.Namespace, vocab_size: int | None = None, special_tokens=None) -> None:
    """Fail early, saying what to change, on settings SDAR training cannot run with
    (:class:`SettingsError` listing every problem of :func:`sdar_problems`)."""
    problems = sdar_problems(args, vocab_size, special_tokens)
    if problems:
        raise SettingsError(problems)


def sdar_problems(args: argparse.Namespace, vocab_size: int | None = None, special_tokens=None) -> list[str]:
    """Every setting SDAR training cannot run with, each saying what to change."""
    problems = context_parallel_problems(args)
    tp = getattr(args, "tensor_model_parallel_size", 1)
    if getattr(args, "sequence_parallel", False) and args.seq_length % tp:
        problems.append(f"--sequence-parallel splits the window over TP={tp}, but --seq-length "
                        f"{args.seq_length} is not a multiple of it")  # fmt: skip
    if getattr(args, "rotary_interleaved", False):
        problems.append("SDAR models use non-interleaved RoPE (Qwen3, Llama): drop --rotary-interleaved")
    if args.position_embedding_type != "rope":
        problems.append(f"SDAR models use RoPE: pass --position-embedding-type rope "
                        f"(got {args.position_embedding_type})")  # fmt: skip
    if (
        args.transformer_impl == "local"
        and not getattr(args, "no_persist_layer_norm", True)
        and not _importable("apex")
    ):
        problems.append("--transformer-impl local without Apex uses torch norms, which cannot persist: "
                        "pass --no-persist-layer-norm")  # fmt: skip
    if (
        args.transformer_impl == "local"
        and getattr(args, "gradient_accumulation_fusion", False)
        and not _importable("fused_weight_gradient_mlp_cuda")
    ):
        problems.append("--transformer-impl local without Apex's CUDA extensions cannot fuse gradient "
                        "accumulation: pass --no-gradient-accumulation-fusion")  # fmt: skip
    have_te = _importable("transformer_engine")
    if getattr(args, "apply_rope_fusion", False) and not have_te:
        problems.append("fused RoPE needs Transformer Engine, which is not installed: pass --no-rope-fusion")
    if (
        getattr(args, "use_distributed_optimizer", False)
        and not (have_te or _importable("apex"))
        and _resumable_checkpoint(args)
    ):
        problems.append("megatron-core 0.19.2's distributed optimizer cannot restore its state with "
                        f"torch's Adam (no Apex or Transformer Engine), and {args.load} holds a checkpoint: "
                        "run where TE or Apex is installed (NGC containers), drop "
                        "--use-distributed-optimizer, or pass --no-load-optim")  # fmt: skip
    if args.transformer_impl == "transformer_engine" and not have_te:
        problems.append("--transformer-impl transformer_engine was asked for but Transformer Engine is not "
                        "installed: install it (NGC PyTorch containers have it) or pass "
                        "--transformer-impl local")  # fmt: skip
    if args.sdar_objective == "sdar":
        if not args.calculate_per_token_loss:
            problems.append(
                "the SDAR loss is normalised by a global token count: pass --calculate-per-token-loss"
            )
        if args.sdar_mask_token_id is None:
            problems.append("--sdar-mask-token-id is required (Qwen3: 151669 '<|MASK|>')")
        if args.attention_dropout != 0.0:
            problems.append("SDAR attention has no dropout: pass --attention-dropout 0")
        if args.sdar_attention_backend == "split":
            if not (getattr(args, "bf16", False) or getattr(args, "fp16", False)):
                problems.append("--sdar-attention-backend split runs flash attention, which needs "
                                "--bf16 or --fp16 (or use --sdar-attention-backend flex)")  # fmt: skip
            head_dim = getattr(args, "kv_channels", None) or args.hidden_size // args.num_attention_heads
            if head_dim > 256 or head_dim % 8:
                problems.append(f"--sdar-attention-backend split runs flash attention, which needs a head "
                                f"size that is a multiple of 8 up to 256 (got {head_dim}); use "
                                "--sdar-attention-backend flex")  # fmt: skip
        known_vocab = vocab_size if args.sdar_mask_token_id is not None else None
        config = sdar_config_from_args(args)
        problems += config.problems(args.seq_length, known_vocab, special_tokens)
    if args.sdar_objective == "ar" and ar_loss_weight(args):
        problems.append("--sdar-ar-loss-weight adds a next-token loss to the diffusion objective, and "
                        "--sdar-objective ar trains that alone: drop the weight")  # fmt: skip
    if getattr(args, "sdar_complementary_masks", False):
        if args.micro_batch_size % 2:
            problems.append(
                f"--sdar-complementary-masks puts each window in a micro-batch twice: --micro-batch-size "
                f"must be even, got {args.micro_batch_size}"
            )
        if getattr(args, "sdar_objective", "sdar") != "sdar":
            problems.append("--sdar-complementary-masks applies to the SDAR objective only")
    if args.sdar_stage == "sft" and getattr(args, "sdar_document_mask", "separate") == "global":
        problems.append(
            "--sdar-document-mask global is the CPT mask; SFT examples must not see each other "
            "(use separate, the default, with --sdar-stage sft)"
        )
    if args.sdar_stage == "sft" and getattr(args, "mock_data", False):
        problems.append("--mock-data only provides CPT windows; use --sdar-stage cpt")
    problems += mask_embedding_noise_problems(args)
    problems += schedule_problems(args)
    return problems
