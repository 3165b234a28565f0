"""SDAR core attention: a Megatron ``core_attention`` module for the block-diffusion mask.

It plugs into ``SelfAttention`` through ``ModuleSpec`` (see :mod:`megatron_sdar.model`). Megatron
hands it the ``attention_mask`` argument untouched; for SDAR that argument is the small ``[b, 2, L]``
layout tensor from :mod:`megatron_sdar.masks`. The attention mask proper is derived from it here and
cached per layout, so all layers of a micro-batch (and an activation-recompute replay) share one
mask, and nothing unpicklable ever crosses ``save_for_backward``.

Back ends, one meaning:

* ``flex``: FlexAttention with a ``BlockMask`` built from the mask function (CUDA; compiled);
* ``split``: one variable-length causal flash-attention call plus a narrow local band, merged by
  log-sum-exp (:mod:`megatron_sdar.split_attention`; CUDA with fp16/bf16, or a slow CPU reference);
* ``sdpa``: ``scaled_dot_product_attention`` with a dense boolean mask (CPU, tests, reference).

GQA is passed through to both kernels (``enable_gqa``) instead of repeating K/V."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_sdar.attention.cache import MASK_CACHE, SDARMaskCache
from megatron_sdar.attention.flex import compiled_flex_attention, default_kernel_options
from megatron_sdar.attention.split import split_sdar_attention
from megatron_sdar.config import ATTENTION_BACKENDS
from megatron_sdar.masks import LAYOUT_POSITION, CleanAttention
from megatron_sdar.positions import PositionRotaryEmbedding, apply_rope


def resolve_backend(backend: str, device: torch.device) -> str:
    """Pick the kernel: FlexAttention on CUDA, dense-mask SDPA elsewhere (FlexAttention has no CPU
    backward)."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown SDAR attention backend {backend!r}; use one of {ATTENTION_BACKENDS}")
    if backend == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    if backend == "flex" and device.type != "cuda":
        raise ValueError("the flex attention backend needs CUDA; use 'sdpa' (or 'auto') on CPU")
    return backend


def core_attention_scale(config: TransformerConfig, softmax_scale: float | None, what: str) -> float:
    """Refuse what these core attentions do not implement; the softmax scale to use."""
    if config.context_parallel_size != 1:
        raise ValueError(
            f"{what} does not support context parallelism yet (--context-parallel-size must be 1)"
        )
    if config.attention_dropout != 0.0:
        raise ValueError(
            f"{what} does not implement attention dropout (got "
            f"attention_dropout={config.attention_dropout}); set --attention-dropout 0"
        )
    return softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)


def _use_rotary(self: MegatronModule, rotary: PositionRotaryEmbedding) -> None:
    """Apply RoPE in this core attention (one compiled kernel each way on CUDA) when its
    ``attention_mask`` argument carries positions; the model passes Megatron no rotary embedding."""
    if self.config.rotary_interleaved:
        raise ValueError("RoPE in the core attention is non-interleaved (Qwen3, Llama)")
    # a plain attribute, not a submodule: the settings hold no state
    object.__setattr__(self, "rotary", rotary)


class SDARCoreAttention(MegatronModule):
    """Core attention over ``[x_t ; x_0]`` under the SDAR mask.

    Inputs follow Megatron's contract: query ``[2L, b, heads_per_tp, d]``, key/value
    ``[2L, b, groups_per_tp, d]``; output ``[2L, b, heads_per_tp * d]``. ``attention_mask`` is the
    ``[b, 2, L]`` layout tensor, or ``[b, 3, L]`` with the clean positions as a third row: then the
    query and key arrive without RoPE (``SDARModel`` passes no rotary embedding to Megatron's
    attention) and it is applied here from tables built once per layout.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        cp_comm_type: str | None = None,
        softmax_scale: float | None = None,
        pg_collection: Any = None,
        clean_attention: CleanAttention | str = CleanAttention.BLOCK_CAUSAL,
        backend: str = "auto",
        mask_cache: SDARMaskCache | None = None,
        kernel_options: dict | None = None,
    ) -> None:
        super().__init__(config=config)
        self.softmax_scale = core_attention_scale(config, softmax_scale, "SDAR attention")
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown SDAR attention backend {backend!r}; use one of {ATTENTION_BACKENDS}")
        self.layer_number = layer_number
        self.clean_attention = CleanAttention(clean_attention)
        self.backend = backend
        self.mask_cache = mask_cache if mask_cache is not None else MASK_CACHE
        self.kernel_options = dict(kernel_options) if kernel_options is not None else None
        self.rotary: PositionRotaryEmbedding | None = None

    use_rotary = _use_rotary

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        if attention_mask is None or attention_mask.dim() != 3 or attention_mask.shape[1] not in (2, 3):
            shape = None if attention_mask is None else tuple(attention_mask.shape)
            raise ValueError(
                "SDAR attention needs the [batch, 2, L] layout tensor from "
                f"megatron_sdar.masks.make_layout as attention_mask, got {shape}"
            )
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDAR attention supports neither packed THD sequences nor attention bias")
        seq, batch = query.shape[0], query.shape[1]
        if seq != 2 * attention_mask.shape[-1] or batch != attention_mask.shape[0]:
            raise ValueError(
                f"query covers {seq} tokens x {batch} rows but the layout describes "
                f"2 x {attention_mask.shape[-1]} tokens x {attention_mask.shape[0]} rows"
            )
        if attention_mask.shape[1] == 3:  # the layout carries positions: RoPE is applied here
            if self.rotary is None:
                raise ValueError(
                    "the layout carries RoPE positions but this SDAR core attention has no rotary "
                    "settings; SDARModel gives them to its layers (use_rotary)"
                )
            clean = attention_mask[:, LAYOUT_POSITION]
            cos, sin = self.mask_cache.rope_tables(
                attention_mask, self.rotary, query.dtype, lambda: torch.cat([clean, clean], dim=-1)
            )
            query, key = apply_rope(query, cos, sin), apply_rope(key, cos, sin)
        backend = resolve_backend(self.backend, query.device)
        mask = self.mask_cache.get(attention_mask, self.clean_attention, backend)
        if backend == "split":
            # [s, b, h, d] -> [b, s, h, d] and back
            out = split_sdar_attention(
                query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), mask, self.softmax_scale
            )
            return out.transpose(0, 1).reshape(seq, batch, -1)
        # [s, b, h, d] -> [b, h, s, d]
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        gqa = q.shape[1] != k.shape[1]
        if backend == "flex":
            options = self.kernel_options if self.kernel_options is not None else default_kernel_options(q)
            out = compiled_flex_attention()(
                q, k, v, block_mask=mask, scale=self.softmax_scale, enable_gqa=gqa,
                kernel_options=options or None,
            )  # fmt: skip
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=self.softmax_scale, enable_gqa=gqa
            )
        # [b, h, s, d] -> [s, b, h * d]
        return out.permute(2, 0, 1, 3).reshape(seq, batch, -1)


def _is_position_row(mask: torch.Tensor | None, batch: int, seq: int) -> bool:
    return (
        mask is not None
        and not mask.is_floating_point()
        and mask.dtype != torch.bool
        and tuple(mask.shape) == (batch, 1, seq)
    )


class CausalCoreAttention(MegatronModule):
    """Causal core attention through ``scaled_dot_product_attention(is_causal=True)``.

    The AR objective's core attention without Transformer Engine: Megatron's local
    ``DotProductAttention`` materialises the ``[b, heads, s, s]`` score matrix, so the AR baseline
    would be measured against an attention SDAR never uses. SDPA picks the flash kernel on CUDA.
    Same contract as Megatron's core attention: ``[s, b, h, d]`` in, ``[s, b, h * d]`` out. Under
    :class:`~megatron_sdar.model.ARModel` the ``attention_mask`` argument is the ``[b, 1, s]``
    position ids and RoPE is applied here, as the SDAR core attention does.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        cp_comm_type: str | None = None,
        softmax_scale: float | None = None,
        pg_collection: Any = None,
    ) -> None:
        super().__init__(config=config)
        self.softmax_scale = core_attention_scale(config, softmax_scale, "causal SDPA attention")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask):
            raise ValueError(f"causal SDPA attention supports causal masks only, got {attn_mask_type}")
        self.layer_number = layer_number
        self.rotary: PositionRotaryEmbedding | None = None
        self.mask_cache = MASK_CACHE

    use_rotary = _use_rotary

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        seq, batch = query.shape[0], query.shape[1]
        positions = self.rotary is not None and _is_position_row(attention_mask, batch, seq)
        if (
            (attention_mask is not None and not positions)
            or attention_bias is not None
            or packed_seq_params is not None
        ):
            raise ValueError("causal SDPA attention takes no attention mask, bias or packed sequences")
        if positions:  # ARModel's position ids: RoPE is applied here
            cos, sin = self.mask_cache.rope_tables(
                attention_mask, self.rotary, query.dtype, lambda: attention_mask[:, 0]
            )
            query, key = apply_rope(query, cos, sin), apply_rope(key, cos, sin)
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=q.shape[1] != k.shape[1]
        )
        return out.permute(2, 0, 1, 3).reshape(seq, batch, -1)
