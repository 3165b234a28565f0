"""Loading Megatron checkpoints (converted or written by training) for generation."""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

import torch

from megatron_sdar.conversion.architecture import Architecture, padded_vocab
from megatron_sdar.conversion.megatron import checkpoint_architecture, resolve_checkpoint


def add_model_source_args(parser: argparse.ArgumentParser) -> None:
    """The flags saying which model to load: an HF folder or a Megatron checkpoint, and its tokenizer."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf-dir", help="HF folder (SDAR export, or a plain model for --mode ar)")
    source.add_argument("--load", help="Megatron checkpoint folder (converted or written by training); "
                                       "under torchrun, tensor parallel over all ranks")  # fmt: skip
    parser.add_argument(
        "--iteration", default=None, help="checkpoint iteration or 'release' (default: latest)"
    )
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer directory (default: found with the model)"
    )


def _init_world() -> int:
    """Join the launcher's world (torchrun) or make a one-process one; tensor parallel = world size."""
    from megatron.core import parallel_state

    from megatron_sdar.local_world import ensure_single_process_world

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        ensure_single_process_world()
        return 1
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    return world


def tensor_parallel_problems(arch: Architecture, tp: int) -> list[str]:
    """What in ``arch`` does not split over ``tp`` tensor-parallel ranks (Megatron asserts on each)."""
    problems = []
    if arch.num_attention_heads % tp or arch.num_query_groups % tp:
        problems.append(f"{arch.num_attention_heads} heads / {arch.num_query_groups} KV groups")
    if arch.ffn_hidden_size % tp:
        problems.append(f"FFN size {arch.ffn_hidden_size}")
    if arch.num_experts and arch.moe_ffn_hidden_size % tp:
        problems.append(f"expert FFN size {arch.moe_ffn_hidden_size}")
    if arch.padded_vocab_size % tp:
        problems.append(f"the padded vocabulary of {arch.padded_vocab_size:,} rows")
    return problems


def check_tensor_parallel(arch: Architecture, tp: int, converted: bool = True, most: int = 8) -> None:
    """Refuse, before any model is built, a tensor-parallel size ``tp`` (the world size) that the
    checkpoint's model does not split over, saying what to change.

    The padded vocabulary is fixed when a checkpoint is written (``--make-vocab-size-divisible-by``
    times the tensor-parallel size it was converted or trained at), so a vocabulary that does not
    split is mended by converting again (``converted``), or by running at a size that divides it.
    """
    problems = tensor_parallel_problems(arch, tp)
    if not problems:
        return
    fits = [n for n in range(1, most + 1) if not tensor_parallel_problems(arch, n)]
    sizes = ", ".join(map(str, fits)) or "none"
    msg = f"the checkpoint does not split over tensor parallel size {tp} (the world size): "
    msg += "; ".join(problems)
    if len(problems) == 1 and problems[0].startswith("the padded vocabulary") and converted:
        divisor = 128 * tp // math.gcd(128, tp)
        msg += (
            f". The padding was fixed at conversion; convert again with --tensor-model-parallel-size {tp} "
            f"(pads the {arch.vocab_size:,}-row vocabulary to {padded_vocab(arch.vocab_size, 128, tp):,} "
            f"rows), or with --make-vocab-size-divisible-by {divisor} (a multiple of 128 and of {tp}). Or run"
        )
    else:
        msg += ". Run"
    msg += f" on a number of ranks it splits over (torchrun --nproc-per-node N; N up to {most}: {sizes})"
    raise ValueError(msg)


def load_megatron_model(
    load: str, iteration: str | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[Any, Architecture, str | None]:
    """``(SDAR model, architecture, tokenizer directory)`` with tensor parallelism over the world."""
    from megatron.core import dist_checkpointing
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_sdar.config import SDARConfig
    from megatron_sdar.conversion.megatron import moe_config
    from megatron_sdar.model.base import qwen3_transformer_config
    from megatron_sdar.model.sdar import build_sdar_model

    path = resolve_checkpoint(load, iteration)
    arch, saved = checkpoint_architecture(load, path)
    check_tensor_parallel(arch, int(os.environ.get("WORLD_SIZE", "1")), converted=saved is None)
    tp = _init_world()
    if device == "cuda" or str(device).startswith("cuda"):
        model_parallel_cuda_manual_seed(0)
    config = qwen3_transformer_config(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads, num_query_groups=arch.num_query_groups,
        kv_channels=arch.kv_channels, layernorm_epsilon=arch.norm_epsilon, qk_layernorm=arch.qk_layernorm,
        tensor_model_parallel_size=tp, params_dtype=dtype, use_cpu_initialization=True,
        perform_initialization=False, **moe_config(arch, "alltoall" if tp > 1 else "allgather"),
    )  # fmt: skip
    sdar = SDARConfig(block_size=arch.block_size or 4, mask_token_id=arch.mask_token_id or 0)
    model = build_sdar_model(
        config, sdar, vocab_size=arch.padded_vocab_size, max_sequence_length=arch.max_position_embeddings,
        share_embeddings_and_output_weights=arch.tied_embeddings, rotary_base=arch.rotary_base,
    ).to(device=device, dtype=dtype)  # fmt: skip
    state = dist_checkpointing.load(model.sharded_state_dict(), path, strict="assume_ok_unexpected")
    model.load_state_dict(state, strict=False)
    tokenizer = os.path.join(load, "tokenizer")
    if not os.path.isdir(tokenizer):
        tokenizer = getattr(saved, "tokenizer_model", None) if saved is not None else None
        tokenizer = tokenizer if tokenizer and os.path.isdir(tokenizer) else None
    return model.eval(), arch, tokenizer


def load_backend(
    hf_dir: str | None = None,
    load: str | None = None,
    iteration: str | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[Any, dict, str | None]:
    """``(back end, {block_size, mask_token_id}, tokenizer directory)`` from an HF folder or a
    Megatron checkpoint (exactly one of ``hf_dir`` and ``load``)."""
    from megatron_sdar.inference.hf_backend import HFBackend, load_hf_model
    from megatron_sdar.inference.megatron_backend import MegatronBackend

    if (hf_dir is None) == (load is None):
        raise ValueError("pass exactly one of an HF folder and a Megatron checkpoint")
    if load is not None:
        model, arch, tokenizer_dir = load_megatron_model(load, iteration, device, dtype)
        sdar = {
            "block_size": arch.block_size,
            "mask_token_id": arch.mask_token_id,
            "clean_attention": arch.clean_attention,
        }
        return MegatronBackend(model, arch.vocab_size), sdar, tokenizer_dir
    model, sdar = load_hf_model(hf_dir, dtype, device)
    return HFBackend(model), sdar, hf_dir
