"""The ``--sdar-*`` argument group and the checks that refuse settings SDAR cannot run with."""

from __future__ import annotations

import argparse
import json
import os

from megatron_sdar.config import ATTENTION_BACKENDS, LossNormalizer, PositionIds, SDARConfig
from megatron_sdar.masks import BlockCounting, CleanAttention
from megatron_sdar.noise import NoiseUnit

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
        loss_normalizer=args.sdar_loss_normalizer,
        clean_attention=args.sdar_clean_attention,
        block_counting=args.sdar_block_counting,
        position_ids=positions,
        attention_backend=args.sdar_attention_backend,
        flex_kernel_options=getattr(args, "sdar_flex_kernel_options", None),
    )


def output_on_masked(args: argparse.Namespace) -> bool:
    """Whether ``--sdar-output-positions`` runs the output layer on the masked positions only."""
    return getattr(args, "sdar_output_positions", "masked") == "masked"


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _resumable_checkpoint(args: argparse.Namespace) -> bool:
    """Whether this run will restore optimizer state from ``--load``."""
    load = getattr(args, "load", None)
    if not load or getattr(args, "finetune", False) or getattr(args, "no_load_optim", False):
        return False
    return os.path.exists(os.path.join(load, "latest_checkpointed_iteration.txt"))


def validate_sdar_args(args: argparse.Namespace, vocab_size: int | None = None, special_tokens=None) -> None:
    """Fail early, saying what to change, on settings SDAR training cannot run with."""
    problems = []
    if args.context_parallel_size > 1:
        problems.append(
            "context parallelism is not implemented yet (design: docs/context_parallel.md): "
            "use --context-parallel-size 1"
        )
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
        try:
            known_vocab = vocab_size if args.sdar_mask_token_id is not None else None
            sdar_config_from_args(args).validate(args.seq_length, known_vocab, special_tokens)
        except ValueError as err:
            problems.append(str(err))
    if args.sdar_stage == "sft" and getattr(args, "mock_data", False):
        problems.append("--mock-data only provides CPT windows; use --sdar-stage cpt")
    if problems:
        raise ValueError("invalid SDAR settings:\n  - " + "\n  - ".join(problems))
