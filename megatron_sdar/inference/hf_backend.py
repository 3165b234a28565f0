"""Decoding back end over ``transformers`` Qwen3 / Qwen3-MoE / Llama modules with our own masks and
KV cache, so an HF SDAR export can be checked and served without Megatron.

The model's own forward cannot express SDAR decoding (a block attends to the cache and to itself
in both directions, and denoising forwards must read the cache without writing it), so this module
runs the model's layers itself: the same projections, norms, rotary embedding and MLP/MoE modules,
with ``scaled_dot_product_attention`` over ``[cache ; new tokens]`` under an explicit mask.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.nn.functional as F

from megatron_sdar.inference.kv_cache import KVCache

BASE_CLASSES = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
}
SDAR_FIELDS = ("block_size", "mask_token_id", "base_model_type", "clean_attention")
# SDAR model types -> their base architecture (released SDAR configs do not name it)
SDAR_BASES = {"sdar": "qwen3", "sdar_moe": "qwen3_moe"}
# config.json fields of an SDAR export that the base architecture's config does not take
SDAR_ONLY = (
    *SDAR_FIELDS, "architectures", "model_type", "auto_map", "qk_norm", "fuse_cross_entropy", "ep_size",
    "micro_forward", "skip_checkpoint", "use_deepep", "debug", "attn_implementation",
)  # fmt: skip


def load_hf_model(path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """``(model, sdar_fields)`` from an HF folder: an SDAR export (``model_type: sdar``) is loaded as
    its base architecture; a plain Qwen3/Llama checkpoint loads as is (``sdar_fields`` empty)."""
    import transformers

    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} not found: pass a HF model folder")
    with open(config_path) as f:
        raw = json.load(f)
    sdar = {k: raw[k] for k in SDAR_FIELDS if k in raw}
    base = raw.get("base_model_type") or SDAR_BASES.get(raw.get("model_type"), raw.get("model_type"))
    if base not in BASE_CLASSES:
        raise ValueError(f"{path}: model type {base!r} is not supported; supported: {sorted(BASE_CLASSES)}")
    config_cls, model_cls = (getattr(transformers, n) for n in BASE_CLASSES[base])
    fields = {k: v for k, v in raw.items() if k not in SDAR_ONLY}
    if fields.get("rope_scaling") is None:  # null in SDAR configs; transformers 5 warns about the name
        fields.pop("rope_scaling", None)
    config = config_cls(**fields)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # it would warn that config.json says model_type "sdar"
    try:
        model = model_cls.from_pretrained(path, config=config, dtype=dtype).to(device).eval()
    finally:
        transformers.logging.set_verbosity(verbosity)
    return model, sdar


class HFBackend:
    """Forward passes over new tokens against a KV cache the caller decides when to extend."""

    def __init__(self, model: Any) -> None:
        from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

        self.model = model
        self.inner = model.model
        self.layers = list(self.inner.layers)
        self._rope = apply_rotary_pos_emb
        self.device = next(model.parameters()).device
        self.vocab_size = model.config.vocab_size
        self.reset(0)

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
        """Logits ``[b, n, V]`` for ``tokens [b, n]``.

        ``self_mask [b, n, n]`` says which new tokens each new token sees (the cache is seen where
        valid); the first ``write`` new tokens' keys and values are appended to the cache, marked
        valid where ``key_valid [b, n]`` is.
        """
        b, n = tokens.shape
        hidden = self.inner.embed_tokens(tokens)
        cos, sin = self.inner.rotary_emb(hidden, positions)
        mask = self.cache.attention_mask(self_mask)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            shape = (b, n, -1, attn.head_dim)
            q, k = attn.q_proj(x).view(shape), attn.k_proj(x).view(shape)
            if hasattr(attn, "q_norm"):
                q, k = attn.q_norm(q), attn.k_norm(k)
            v = attn.v_proj(x).view(shape).transpose(1, 2)
            q, k = self._rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            keys, values = self.cache.extend(i, k, v, write)
            out = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, scale=attn.scaling, enable_gqa=q.shape[1] != k.shape[1]
            )
            hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(b, n, -1))
            mlp = layer.mlp(layer.post_attention_layernorm(hidden))
            hidden = hidden + (mlp[0] if isinstance(mlp, tuple) else mlp)
        self.cache.commit(key_valid, write)
        return self.model.lm_head(self.inner.norm(hidden))
