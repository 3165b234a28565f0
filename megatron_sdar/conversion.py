"""Parameter mapping between HF Llama/Qwen3 causal LMs and Megatron-Core GPT models (local spec).

Layouts Megatron uses that HF does not:

* ``linear_qkv``: for each KV group ``g``, the rows ``[q heads of g ; k_g ; v_g]``, so a contiguous
  split over tensor-parallel ranks gives each rank whole groups;
* ``linear_fc1``: ``[gate ; up]`` (SwiGLU) stacked on the output dimension.

These functions work on full (unsplit) tensors of one model; they copy nothing they do not need
to, and round trips are bit-exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def heads_per_group(self) -> int:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_heads} heads do not divide into {self.num_kv_heads} KV groups")
        return self.num_heads // self.num_kv_heads


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: AttentionShape) -> torch.Tensor:
    """HF ``q_proj``/``k_proj``/``v_proj`` weights -> Megatron's grouped ``linear_qkv`` weight."""
    d, g, hpg = shape.head_dim, shape.num_kv_heads, shape.heads_per_group
    hidden = q.shape[-1]
    q = q.reshape(g, hpg * d, hidden)
    k = k.reshape(g, d, hidden)
    v = v.reshape(g, d, hidden)
    return torch.cat([q, k, v], dim=1).reshape(g * (hpg + 2) * d, hidden)


def split_qkv(qkv: torch.Tensor, shape: AttentionShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv`."""
    d, g, hpg = shape.head_dim, shape.num_kv_heads, shape.heads_per_group
    hidden = qkv.shape[-1]
    grouped = qkv.reshape(g, (hpg + 2) * d, hidden)
    q = grouped[:, : hpg * d].reshape(g * hpg * d, hidden)
    k = grouped[:, hpg * d : (hpg + 1) * d].reshape(g * d, hidden)
    v = grouped[:, (hpg + 1) * d :].reshape(g * d, hidden)
    return q.contiguous(), k.contiguous(), v.contiguous()


_LAYER_DIRECT = {
    # HF name inside a layer -> Megatron local-spec name inside a layer
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "self_attn.q_norm.weight": "self_attention.q_layernorm.weight",
    "self_attn.k_norm.weight": "self_attention.k_layernorm.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
}


def hf_layer_to_mcore(hf: dict[str, torch.Tensor], shape: AttentionShape) -> dict[str, torch.Tensor]:
    """One decoder layer: HF names relative to ``model.layers.i.`` -> Megatron names relative to
    ``decoder.layers.i.``."""
    out = {mc: hf[name] for name, mc in _LAYER_DIRECT.items() if name in hf}
    out["self_attention.linear_qkv.weight"] = fuse_qkv(
        hf["self_attn.q_proj.weight"], hf["self_attn.k_proj.weight"], hf["self_attn.v_proj.weight"], shape
    )
    out["mlp.linear_fc1.weight"] = torch.cat([hf["mlp.gate_proj.weight"], hf["mlp.up_proj.weight"]], dim=0)
    unknown = set(hf) - set(_LAYER_DIRECT) - {
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
        "mlp.gate_proj.weight", "mlp.up_proj.weight",
    }  # fmt: skip
    if unknown:
        raise ValueError(f"unsupported HF layer parameters: {sorted(unknown)}")
    return out


def mcore_layer_to_hf(mc: dict[str, torch.Tensor], shape: AttentionShape) -> dict[str, torch.Tensor]:
    """Inverse of :func:`hf_layer_to_mcore`."""
    inverse = {v: k for k, v in _LAYER_DIRECT.items()}
    out = {inverse[name]: t for name, t in mc.items() if name in inverse}
    q, k, v = split_qkv(mc["self_attention.linear_qkv.weight"], shape)
    out.update({"self_attn.q_proj.weight": q, "self_attn.k_proj.weight": k, "self_attn.v_proj.weight": v})
    gate, up = mc["mlp.linear_fc1.weight"].chunk(2, dim=0)
    out.update({"mlp.gate_proj.weight": gate.contiguous(), "mlp.up_proj.weight": up.contiguous()})
    return out


def hf_to_mcore_state_dict(hf: dict[str, torch.Tensor], shape: AttentionShape, num_layers: int,
                           tied: bool) -> dict[str, torch.Tensor]:  # fmt: skip
    """A whole HF Llama/Qwen3 state dict -> Megatron GPT (local spec, unsplit) state dict."""
    out = {
        "embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
        "decoder.final_layernorm.weight": hf["model.norm.weight"],
    }
    if not tied:
        out["output_layer.weight"] = hf["lm_head.weight"]
    for i in range(num_layers):
        prefix = f"model.layers.{i}."
        layer = {k[len(prefix) :]: v for k, v in hf.items() if k.startswith(prefix)}
        if not layer:
            raise ValueError(f"the HF checkpoint has no parameters for layer {i}")
        for name, t in hf_layer_to_mcore(layer, shape).items():
            out[f"decoder.layers.{i}.{name}"] = t
    return out


def mcore_to_hf_state_dict(mc: dict[str, torch.Tensor], shape: AttentionShape, num_layers: int,
                           tied: bool) -> dict[str, torch.Tensor]:  # fmt: skip
    """Inverse of :func:`hf_to_mcore_state_dict`."""
    out = {
        "model.embed_tokens.weight": mc["embedding.word_embeddings.weight"],
        "model.norm.weight": mc["decoder.final_layernorm.weight"],
    }
    if not tied:
        out["lm_head.weight"] = mc["output_layer.weight"]
    for i in range(num_layers):
        prefix = f"decoder.layers.{i}."
        layer = {k[len(prefix) :]: v for k, v in mc.items() if k.startswith(prefix)}
        for name, t in mcore_layer_to_hf(layer, shape).items():
            out[f"model.layers.{i}.{name}"] = t
    return out
