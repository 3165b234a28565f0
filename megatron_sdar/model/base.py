"""What the SDAR model and the AR baseline share: ``GPTModel`` with RoPE in its core attentions, and
Qwen3's ``TransformerConfig`` choices."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_sdar.attention.cache import SDARMaskCache
from megatron_sdar.positions import PositionRotaryEmbedding


class RoPEInCoreModel(GPTModel):
    """``GPTModel`` whose core attentions apply RoPE themselves, from positions the model hands them
    through ``attention_mask`` (one compiled kernel each way on CUDA, tables built once per
    micro-batch); Megatron's attention gets no rotary embedding, which it fuses only with TE.

    The model owns the cache of masks and RoPE tables (:attr:`mask_cache`) and binds it, with its
    rotary settings, to its core attentions. Subclasses name the core attention type that accepts
    the positions; ``_rope_in_core`` records whether this stage holds any such layer.
    """

    core_attention_type: type
    description: str

    def __init__(
        self,
        config: TransformerConfig,
        transformer_layer_spec: Any,
        vocab_size: int,
        max_sequence_length: int,
        rotary_base: float = 10000.0,
        rotary_percent: float = 1.0,
        **kwargs: Any,
    ) -> None:
        if kwargs.pop("position_embedding_type", "rope") != "rope":
            raise ValueError(f"{self.description} uses rotary position embeddings only")
        # The parent builds no rotary module: positions come from explicit ids (PositionRotaryEmbedding).
        super().__init__(
            config=config,
            transformer_layer_spec=transformer_layer_spec,
            vocab_size=vocab_size,
            max_sequence_length=max_sequence_length,
            position_embedding_type="none",
            **kwargs,
        )
        self.sdar_rotary = PositionRotaryEmbedding(config.kv_channels, rotary_base, rotary_percent)
        self.rotary_base = rotary_base
        self.mask_cache = SDARMaskCache()
        self.apply_rope_in_core(True)

    def apply_rope_in_core(self, enabled: bool) -> None:
        """Bind the core attentions to the model's rotary settings and mask cache (``enabled``: RoPE
        in the core attention, the default) or only to the cache (Megatron's RoPE path, which gives
        the same numbers; for comparisons). A stage without such layers uses Megatron's path."""
        cores = [m for m in self.modules() if isinstance(m, self.core_attention_type)]
        for core in cores:
            core.bind(self.sdar_rotary if enabled else None, self.mask_cache)
        self._rope_in_core = enabled and bool(cores)


def qwen3_transformer_config(**overrides: Any) -> TransformerConfig:
    """A ``TransformerConfig`` with Qwen3's architecture choices (GQA sizes come from overrides)."""
    base: dict[str, Any] = dict(
        normalization="RMSNorm",
        layernorm_epsilon=1e-6,
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
    )
    base.update(overrides)
    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    unknown = set(base) - fields
    if unknown:
        raise ValueError(f"not TransformerConfig fields: {sorted(unknown)}")
    return TransformerConfig(**base)
