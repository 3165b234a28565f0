"""Parameter mapping between HF Llama/Qwen3/Qwen3-MoE causal LMs and Megatron-Core GPT models.

Layouts Megatron uses that HF does not:

* ``linear_qkv``: for each KV group ``g``, the rows ``[q heads of g ; k_g ; v_g]``, so a contiguous
  split over tensor-parallel ranks gives each rank whole groups;
* ``linear_fc1``: ``[gate ; up]`` (SwiGLU) stacked on the output dimension, for the dense MLP and
  for each expert (``mlp.experts.local_experts.{e}``, the router is ``mlp.router``; Megatron's
  checkpoint layout places expert ``e`` at its global index whatever the expert parallelism).

These functions work on full (unsplit) tensors of one model; they copy nothing they do not need
to, and round trips are bit-exact.
"""

from __future__ import annotations

from collections.abc import Callable
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
_QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
_FC1 = ("mlp.gate_proj.weight", "mlp.up_proj.weight")
_TOP = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
_LAYER_PREFIX = ("decoder.layers.", "model.layers.")


def _split_layer_name(name: str, prefix: str) -> tuple[int, str] | None:
    if not name.startswith(prefix):
        return None
    idx, rest = name[len(prefix) :].split(".", 1)
    return int(idx), rest


_EXPERT = "mlp.experts.local_experts."


def hf_sources(mcore_name: str) -> tuple[str, ...]:
    """The HF tensors a Megatron (local spec, unsplit) parameter is built from."""
    if mcore_name in _TOP:
        return (_TOP[mcore_name],)
    split = _split_layer_name(mcore_name, _LAYER_PREFIX[0])
    if split is None:
        raise ValueError(f"no HF source known for Megatron parameter {mcore_name!r}")
    i, rest = split
    inverse = {v: k for k, v in _LAYER_DIRECT.items()}
    if rest in inverse:
        names = (inverse[rest],)
    elif rest == "self_attention.linear_qkv.weight":
        names = _QKV
    elif rest == "mlp.linear_fc1.weight":
        names = _FC1
    elif rest == "mlp.router.weight":
        names = ("mlp.gate.weight",)
    elif rest.startswith(_EXPERT) and rest.count(".") == 5:
        expert, linear = rest[len(_EXPERT) :].split(".", 1)
        hf = f"mlp.experts.{int(expert)}."
        if linear == "linear_fc1.weight":
            names = (hf + "gate_proj.weight", hf + "up_proj.weight")
        elif linear == "linear_fc2.weight":
            names = (hf + "down_proj.weight",)
        else:
            raise ValueError(f"no HF source known for Megatron parameter {mcore_name!r}")
    else:
        raise ValueError(f"no HF source known for Megatron parameter {mcore_name!r}")
    return tuple(f"{_LAYER_PREFIX[1]}{i}.{n}" for n in names)


def mcore_param_from_hf(
    mcore_name: str, read: Callable[[str], torch.Tensor], shape: AttentionShape
) -> torch.Tensor:
    """Build one Megatron parameter from the HF tensors ``read(name)`` returns."""
    sources = [read(n) for n in hf_sources(mcore_name)]
    if mcore_name.endswith("self_attention.linear_qkv.weight"):
        return fuse_qkv(*sources, shape)
    if mcore_name.endswith("linear_fc1.weight"):
        return torch.cat(sources, dim=0)
    return sources[0]


def hf_params_from_mcore(
    mcore_name: str, tensor: torch.Tensor, shape: AttentionShape
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`mcore_param_from_hf`: the HF tensors one Megatron parameter holds."""
    names = hf_sources(mcore_name)
    if mcore_name.endswith("self_attention.linear_qkv.weight"):
        return dict(zip(names, split_qkv(tensor, shape)))
    if mcore_name.endswith("linear_fc1.weight"):
        return dict(zip(names, (c.contiguous() for c in tensor.chunk(2, dim=0))))
    return {names[0]: tensor}


def mcore_names_for_hf(hf_names: list[str], num_layers: int, tied: bool, num_experts: int = 0) -> list[str]:
    """The Megatron parameters an HF checkpoint with these tensor names converts to."""
    present = set(hf_names)
    names = ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight"]
    if not tied:
        names.append("output_layer.weight")
    known = set(_TOP.values())
    for i in range(num_layers):
        layer = {n for n in present if n.startswith(f"model.layers.{i}.")}
        if not layer:
            raise ValueError(f"the HF checkpoint has no parameters for layer {i}")
        candidates = [*_LAYER_DIRECT.values(), "self_attention.linear_qkv.weight", "mlp.linear_fc1.weight"]
        if num_experts:
            candidates.append("mlp.router.weight")
            for e in range(num_experts):
                candidates += [f"{_EXPERT}{e}.linear_fc1.weight", f"{_EXPERT}{e}.linear_fc2.weight"]
        for rest in candidates:
            name = f"decoder.layers.{i}.{rest}"
            sources = hf_sources(name)
            if all(src in present for src in sources):
                names.append(name)
                known.update(sources)
    unknown = present - known - ({"lm_head.weight"} if tied else set())
    if unknown:
        raise ValueError(f"unsupported HF parameters: {sorted(unknown)[:8]}")
    return names


def hf_to_mcore_state_dict(hf: dict[str, torch.Tensor], shape: AttentionShape, num_layers: int,
                           tied: bool, num_experts: int = 0) -> dict[str, torch.Tensor]:  # fmt: skip
    """A whole HF Llama/Qwen3/Qwen3-MoE state dict -> Megatron GPT (local spec, unsplit) state dict."""
    return {
        n: mcore_param_from_hf(n, hf.__getitem__, shape)
        for n in mcore_names_for_hf(list(hf), num_layers, tied, num_experts)
    }


def mcore_to_hf_state_dict(mc: dict[str, torch.Tensor], shape: AttentionShape) -> dict[str, torch.Tensor]:
    """Inverse of :func:`hf_to_mcore_state_dict` (``_extra_state`` entries are skipped)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in mc.items():
        if not name.endswith("_extra_state"):
            out.update(hf_params_from_mcore(name, tensor, shape))
    return out
