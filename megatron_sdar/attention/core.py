"""SDAR core attention: a Megatron ``core_attention`` module for the block-diffusion mask.

It plugs into ``SelfAttention`` through ``ModuleSpec`` (see :mod:`megatron_sdar.model`). Megatron
hands it the ``attention_mask`` argument untouched; for SDAR that argument is the small layout
tensor from :mod:`megatron_sdar.masks` (``[b, 2, L]``, or ``[b, 3, L]`` with the RoPE positions
when the model binds its rotary settings to the layer). The attention mask proper is derived from it
here and cached per layout in the cache the model owns, so all layers of a micro-batch (and an
activation-recompute replay) share one mask, and nothing unpicklable ever crosses
``save_for_backward``.

Back ends, one meaning:

* ``flex``: FlexAttention with a ``BlockMask`` built from the mask function (CUDA; compiled);
* ``split``: one variable-length causal flash-attention call plus a narrow local band, merged by
  log-sum-exp (:mod:`megatron_sdar.attention.split`; CUDA with fp16/bf16, or a slow CPU reference);
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

from megatron_sdar.attention.cache import SDARMaskCache
from megatron_sdar.attention.flex import compiled_flex_attention, default_kernel_options
from megatron_sdar.attention.split import split_sdar_attention
from megatron_sdar.config import ATTENTION_BACKENDS
from megatron_sdar.context_parallel import attended_keys, cp_plan
from megatron_sdar.masks import LAYOUT_POSITION, LAYOUT_ROWS, LAYOUT_ROWS_WITH_POSITIONS, CleanAttention
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


def core_attention_scale(
    config: TransformerConfig, softmax_scale: float | None, what: str, context_parallel: bool = False
) -> float:
    """Refuse what these core attentions do not implement; the softmax scale to use."""
    if config.context_parallel_size != 1 and not context_parallel:
        raise ValueError(f"{what} does not support context parallelism (--context-parallel-size must be 1)")
    if config.attention_dropout != 0.0:
        raise ValueError(
            f"{what} does not implement attention dropout (got "
            f"attention_dropout={config.attention_dropout}); set --attention-dropout 0"
        )
    return softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)


class _ModelBound(MegatronModule):
    """A core attention the model can bind to its RoPE settings and its mask cache."""

    def bind(self, rotary: PositionRotaryEmbedding | None, mask_cache: SDARMaskCache) -> None:
        """Apply RoPE here (one compiled kernel each way on CUDA; the model passes Megatron no rotary
        embedding), from positions the model hands over in ``attention_mask``, and share the model's
        cache of masks and RoPE tables with its other layers. ``rotary=None``: RoPE is not applied
        here (Megatron's attention applies it) and ``attention_mask`` carries no positions."""
        if rotary is not None and self.config.rotary_interleaved:
            raise ValueError("RoPE in the core attention is non-interleaved (Qwen3, Llama)")
        # plain attributes, not submodules: the settings and the cache hold no parameters
        object.__setattr__(self, "rotary", rotary)
        object.__setattr__(self, "mask_cache", mask_cache)


class SDARCoreAttention(_ModelBound):
    """Core attention over ``[x_t ; x_0]`` under the SDAR mask.

    Inputs follow Megatron's contract: query ``[2L, b, heads_per_tp, d]``, key/value
    ``[2L, b, groups_per_tp, d]``; output ``[2L, b, heads_per_tp * d]``. ``attention_mask`` is the
    ``[b, 2, L]`` layout tensor; once the model has bound its rotary settings (:meth:`bind`), it is
    the ``[b, 3, L]`` layout with the clean positions as a third row, and the query and key arrive
    without RoPE (``SDARModel`` passes no rotary embedding to Megatron's attention): it is applied
    here from tables built once per layout.
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
        block_size_bound: int | None = None,
    ) -> None:
        super().__init__(config=config)
        self.softmax_scale = core_attention_scale(
            config, softmax_scale, "SDAR attention", context_parallel=True
        )
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown SDAR attention backend {backend!r}; use one of {ATTENTION_BACKENDS}")
        if config.context_parallel_size > 1 and backend == "split":
            raise ValueError(
                "the split attention back end does not support context parallelism yet: use "
                "--sdar-attention-backend flex (or auto) with --context-parallel-size > 1"
            )
        # a process group, not a submodule
        object.__setattr__(self, "cp_group", getattr(pg_collection, "cp", None))
        self.layer_number = layer_number
        self.clean_attention = CleanAttention(clean_attention)
        self.backend = backend
        self.mask_cache = mask_cache if mask_cache is not None else SDARMaskCache()
        self.kernel_options = dict(kernel_options) if kernel_options is not None else None
        self.rotary: PositionRotaryEmbedding | None = None
        # under context parallelism: noised keys within this distance of a rank's chunks are exchanged
        self.halo = max((block_size_bound or 1) - 1, 0)

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
        rows = LAYOUT_ROWS if self.rotary is None else LAYOUT_ROWS_WITH_POSITIONS
        if attention_mask is None or attention_mask.dim() != 3 or attention_mask.shape[1] != rows:
            shape = None if attention_mask is None else tuple(attention_mask.shape)
            wanted = (
                "the [batch, 2, L] layout tensor from megatron_sdar.masks.make_layout"
                if self.rotary is None
                else "the [batch, 3, L] layout with RoPE positions (masks.layout_with_positions), as "
                "SDARModel passes it to the layers it bound"
            )
            raise ValueError(f"SDAR attention needs {wanted} as attention_mask, got {shape}")
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDAR attention supports neither packed THD sequences nor attention bias")
        seq, batch = query.shape[0], query.shape[1]
        cp_size = self.config.context_parallel_size
        window = attention_mask.shape[-1]
        if seq * cp_size != 2 * window or batch != attention_mask.shape[0]:
            held = f" (this rank's 2L / {cp_size} under context parallelism)" if cp_size > 1 else ""
            raise ValueError(
                f"query covers {seq} tokens{held} x {batch} rows but the layout describes "
                f"2 x {window} tokens x {attention_mask.shape[0]} rows"
            )
        plan, variant = None, ()  # under context parallelism: what this rank exchanges and attends
        if cp_size > 1:
            if self.rotary is None:
                raise ValueError(
                    "context parallelism needs RoPE in the SDAR core attention (SDARModel binds it)"
                )
            rank = self._cp_rank()
            plan = cp_plan(window, cp_size, rank, self.halo, query.device)
            variant = (rank, cp_size, self.halo)
        if self.rotary is not None:  # the layout carries positions: RoPE is applied here
            clean = attention_mask[:, LAYOUT_POSITION]
            if plan is None:
                positions = lambda: torch.cat([clean, clean], dim=-1)  # noqa: E731
            else:
                positions = lambda: clean.index_select(1, plan.query_index % window)  # noqa: E731
            cos, sin = self.mask_cache.rope_tables(
                attention_mask, self.rotary, query.dtype, positions, variant
            )
            query, key = apply_rope(query, cos, sin), apply_rope(key, cos, sin)
        if plan is not None:  # the keys and values this rank's queries may see, from every rank
            group = self._cp_process_group()
            key, value = attended_keys(key, plan, group), attended_keys(value, plan, group)
        backend = resolve_backend(self.backend, query.device)
        mask = self.mask_cache.get(
            attention_mask, self.clean_attention, backend,
            indices=None if plan is None else (variant, plan.query_index, plan.key_index),
        )  # fmt: skip
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

    def _cp_process_group(self) -> Any:
        if self.cp_group is not None:
            return self.cp_group
        from megatron.core import parallel_state

        return parallel_state.get_context_parallel_group()

    def _cp_rank(self) -> int:
        return torch.distributed.get_rank(self._cp_process_group())


class CausalCoreAttention(_ModelBound):
    """Causal core attention through ``scaled_dot_product_attention(is_causal=True)``.

    The AR objective's core attention without Transformer Engine: Megatron's local
    ``DotProductAttention`` materialises the ``[b, heads, s, s]`` score matrix, so the AR baseline
    would be measured against an attention SDAR never uses. SDPA picks the flash kernel on CUDA.
    Same contract as Megatron's core attention: ``[s, b, h, d]`` in, ``[s, b, h * d]`` out. Under
    :class:`~megatron_sdar.model.ARModel`, which binds its rotary settings (:meth:`bind`), the
    ``attention_mask`` argument is the ``[b, 1, s]`` integer position ids and RoPE is applied here, as
    the SDAR core attention does; unbound it takes no mask.
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
        self.mask_cache = SDARMaskCache()

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
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("causal SDPA attention takes no attention bias or packed sequences")
        if self.rotary is None and attention_mask is not None:
            raise ValueError("causal SDPA attention takes no attention mask (it is causal)")
        if self.rotary is not None and (
            attention_mask is None
            or attention_mask.is_floating_point()
            or attention_mask.dtype == torch.bool
            or tuple(attention_mask.shape) != (batch, 1, seq)
        ):
            shape = None if attention_mask is None else tuple(attention_mask.shape)
            raise ValueError(
                f"this causal attention applies RoPE: it needs the [{batch}, 1, {seq}] integer position "
                f"ids as attention_mask (ARModel passes them), got {shape}"
            )
        if self.rotary is not None:  # ARModel's position ids: RoPE is applied here
            cos, sin = self.mask_cache.rope_tables(
                attention_mask, self.rotary, query.dtype, lambda: attention_mask[:, 0]
            )
            query, key = apply_rope(query, cos, sin), apply_rope(key, cos, sin)
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=q.shape[1] != k.shape[1]
        )
        return out.permute(2, 0, 1, 3).reshape(seq, batch, -1)
