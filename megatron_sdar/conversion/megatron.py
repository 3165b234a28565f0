"""The Megatron side of conversion: checkpoint folders, the architecture a checkpoint records, and the
model whose layout Megatron stores."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from megatron_sdar.conversion.architecture import (
    Architecture,
    architecture_from_megatron_args,
    architecture_mismatches,
)

ARCHITECTURE_FILE = "sdar_architecture.json"


def check_checkpoint_architecture(checkpoint_dir: str | None, args: Any) -> None:
    """Refuse to start from a converted checkpoint whose architecture disagrees with the flags."""
    if not checkpoint_dir:
        return
    path = os.path.join(checkpoint_dir, ARCHITECTURE_FILE)
    if not os.path.isfile(path):
        return
    arch = read_recorded_architecture(path)
    problems = architecture_mismatches(arch, args)
    if problems:
        raise ValueError(
            f"the checkpoint in {checkpoint_dir} was converted for a different architecture; use the flags "
            f"in {path} ('megatron_args'):\n  - " + "\n  - ".join(problems)
        )


def read_recorded_architecture(path: str) -> Architecture:
    """The architecture a converter recorded in ``sdar_architecture.json`` (a :class:`ValueError`
    naming the file when it cannot be read as one)."""
    try:
        with open(path, encoding="utf-8") as f:
            recorded = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    fields = {f.name for f in dataclasses.fields(Architecture)}
    required = {f.name for f in dataclasses.fields(Architecture) if f.default is dataclasses.MISSING}
    entry = recorded.get("architecture") if isinstance(recorded, dict) else None
    if not isinstance(entry, dict):
        raise ValueError(f"{path} has no 'architecture' object (was it written by convert_hf_to_mcore.py?)")
    unknown, missing = sorted(set(entry) - fields), sorted(required - set(entry))
    if unknown or missing:
        raise ValueError(
            f"{path}: 'architecture' "
            + "; ".join(
                ([f"lacks {', '.join(missing)}"] if missing else [])
                + ([f"has unknown fields {', '.join(unknown)}"] if unknown else [])
            )
        )
    return Architecture(**entry)


def moe_config(arch: Architecture, dispatcher: str = "allgather") -> dict[str, Any]:
    """``TransformerConfig`` fields for ``arch``'s experts (empty for dense models)."""
    if not arch.num_experts:
        return {}
    return dict(
        num_moe_experts=arch.num_experts, moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
        moe_router_topk=arch.moe_router_topk, moe_router_pre_softmax=not arch.moe_norm_topk_prob,
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=arch.moe_aux_loss_coeff,
        moe_token_dispatcher_type=dispatcher, moe_grouped_gemm=False,
    )  # fmt: skip


def meta_model(arch: Architecture) -> Any:
    """The SDAR model for ``arch`` at TP=PP=1 on the ``meta`` device: parameter names, shapes and
    Megatron's checkpoint layout without allocating weights."""
    import torch

    from megatron_sdar.config import SDARConfig
    from megatron_sdar.local_world import ensure_single_process_world
    from megatron_sdar.model.base import qwen3_transformer_config
    from megatron_sdar.model.sdar import build_sdar_model

    ensure_single_process_world()
    config = qwen3_transformer_config(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads, num_query_groups=arch.num_query_groups,
        kv_channels=arch.kv_channels, layernorm_epsilon=arch.norm_epsilon, qk_layernorm=arch.qk_layernorm,
        use_cpu_initialization=True, perform_initialization=False, **moe_config(arch),
    )  # fmt: skip
    with torch.device("meta"):
        return build_sdar_model(
            config, SDARConfig(), vocab_size=arch.padded_vocab_size,
            max_sequence_length=arch.max_position_embeddings,
            share_embeddings_and_output_weights=arch.tied_embeddings, rotary_base=arch.rotary_base,
        )  # fmt: skip


def resolve_checkpoint(load: str, iteration: str | None = None) -> str:
    """The ``release`` or ``iter_*`` directory of a Megatron checkpoint folder."""
    tracker = os.path.join(load, "latest_checkpointed_iteration.txt")
    if iteration is None:
        if not os.path.isfile(tracker):
            raise ValueError(f"{tracker} not found: pass a Megatron checkpoint directory")
        with open(tracker) as f:
            iteration = f.read().strip()
        source = tracker
    else:
        source = "--iteration"
    if iteration != "release" and not iteration.isdigit():
        raise ValueError(f"{source} names iteration {iteration!r}; expected 'release' or a number")
    name = "release" if iteration == "release" else f"iter_{int(iteration):07d}"
    path = os.path.join(load, name)
    if not os.path.isfile(os.path.join(path, "metadata.json")):
        raise ValueError(f"{path} is not a torch_dist checkpoint (no metadata.json)")
    return path


def checkpoint_architecture(
    load: str, path: str, vocab_size: int | None = None, recorded: str | None = None
) -> tuple[Architecture, Any]:
    """``(architecture, stored Megatron args or None)``: from ``sdar_architecture.json`` (``recorded``,
    default next to ``load``) when the converter wrote one, else from the arguments a training run
    stored in the checkpoint ``path``."""
    recorded = recorded or os.path.join(load, ARCHITECTURE_FILE)
    if os.path.isfile(recorded):
        arch = read_recorded_architecture(recorded)
        if vocab_size is not None:
            if not 0 < vocab_size <= arch.padded_vocab_size:
                raise ValueError(
                    f"vocabulary size {vocab_size} must be in 1..{arch.padded_vocab_size} (the checkpoint's "
                    f"padded rows)"
                )
            arch.vocab_size = vocab_size
        return arch, None
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict

    saved = load_common_state_dict(path).get("args")
    if saved is None:
        raise ValueError(f"{recorded} not found and {path} stores no Megatron arguments")
    return architecture_from_megatron_args(saved, vocab_size), saved
