"""Decoding back end over a Megatron SDAR (or AR) model, tensor parallelism included.

Runs the model's own modules layer by layer (norms, ``linear_qkv`` with its grouped layout and
QK-norm, rotary embedding, ``linear_proj``, MLP or MoE, output layer) with the SDAR decoding masks
and a KV cache over this rank's heads, the same contract as :class:`HFBackend`. Under tensor
parallelism every rank runs it on the same tokens; the row-parallel layers reduce across ranks and
the vocabulary-parallel logits are gathered.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from megatron_sdar.inference.kv_cache import KVCache


class MegatronBackend:
    def __init__(self, model: Any, vocab_size: int, rotary_base: float | None = None) -> None:
        from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

        from megatron_sdar.positions import PositionRotaryEmbedding

        while hasattr(model, "module"):  # DDP / Float16Module wrappers
            model = model.module
        if not (model.pre_process and model.post_process):
            raise ValueError("generation needs the whole model on each rank: use pipeline parallel size 1")
        if model.config.sequence_parallel:
            raise ValueError("generation runs without sequence parallelism: build the model without it")
        self.model = model
        self.layers = list(model.decoder.layers)
        self.vocab_size = vocab_size
        self.device = next(model.parameters()).device
        self._rope = apply_rotary_pos_emb
        rotary = getattr(model, "sdar_rotary", None)
        if rotary is None:  # a stock GPTModel (AR objective): same rotary table from explicit positions
            if rotary_base is None:
                raise ValueError("pass rotary_base for a model without SDAR rotary embeddings")
            rotary = PositionRotaryEmbedding(model.config.kv_channels, rotary_base)
        self.rotary = rotary
        self.reset(0)

    def _scale(self, attn: Any) -> float:
        scale = getattr(attn.core_attention, "softmax_scale", None)
        return scale if scale is not None else self.model.config.kv_channels**-0.5

    def reset(self, batch: int) -> None:
        self.cache = KVCache(len(self.layers), batch, self.device)

    @property
    def cache_length(self) -> int:
        return self.cache.length

    @torch.no_grad()
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        self_mask: torch.Tensor,
        key_valid: torch.Tensor,
        write: int = 0,
    ) -> torch.Tensor:
        """Logits ``[b, n, vocab]`` (full vocabulary on every rank); see :meth:`HFBackend.forward`."""
        b, n = tokens.shape
        model = self.model
        hidden = model.embedding(input_ids=tokens, position_ids=None)  # [n, b, h]
        freqs = self.rotary(positions)
        mask = self.cache.attention_mask(self_mask)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attention
            q, k, v = attn.get_query_key_value_tensors(layer.input_layernorm(hidden), None)[:3]
            q = self._rope(q, freqs, config=attn.config)
            k = self._rope(k, freqs, config=attn.config)
            q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, n, d]
            keys, values = self.cache.extend(i, k, v, write)
            out = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, scale=self._scale(attn),
                enable_gqa=q.shape[1] != k.shape[1],
            )  # fmt: skip
            out, bias = attn.linear_proj(out.permute(2, 0, 1, 3).reshape(n, b, -1))
            hidden = hidden + (out if bias is None else out + bias)
            mlp = layer.mlp(layer.pre_mlp_layernorm(hidden))
            out, bias = mlp if isinstance(mlp, tuple) else (mlp, None)
            hidden = hidden + (out if bias is None else out + bias)
        self.cache.commit(key_valid, write)
        hidden = model.decoder.final_layernorm(hidden)
        weight = (
            model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
        )
        logits, _ = model.output_layer(hidden, weight=weight)
        return _gather_vocab(logits).transpose(0, 1)


def _gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """Concatenate the tensor-parallel ranks' vocabulary shards (on whatever device they live)."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    world = torch.distributed.get_world_size(group)
    if world == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(world)]
    torch.distributed.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)
