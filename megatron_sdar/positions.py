"""Rotary position embeddings driven by explicit position ids.

Megatron's stock ``RotaryEmbedding`` always rotates by ``0..seq_len-1``. SDAR needs the noised copy
``x_t`` to carry the clean copy's positions (and, for SFT packing, positions that restart per
document), so the table is computed from the ``[b, 2L]`` position ids instead. The result has the
``[s, b, 1, d]`` shape that Megatron's ``apply_rotary_pos_emb`` broadcasts over heads.

:func:`apply_rope` is the rotation itself, for the SDAR core attention: Megatron fuses RoPE only
through Transformer Engine and otherwise runs it as a chain of elementwise kernels per query and
key (cos, sin, casts, the half rotation, two products, a sum, a concatenation, and their
gradients). Applied in the core attention it is one compiled kernel each way on CUDA, with the
cos/sin tables built once per micro-batch instead of once per layer.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_sdar.compiled import compiled_on_cuda
from megatron_sdar.masks import positions_in_document


class PositionRotaryEmbedding(nn.Module):
    """``freqs[s, b, 1, d] = pos[b, s] * inv_freq`` (halves concatenated, as Megatron and HF do)."""

    def __init__(self, kv_channels: int, rotary_base: float = 10000.0, rotary_percent: float = 1.0) -> None:
        super().__init__()
        dim = int(kv_channels * rotary_percent)
        if dim % 2 != 0:
            raise ValueError(f"rotary dimension must be even, got {dim}")
        self.dim = dim
        self.rotary_base = float(rotary_base)

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        exponent = torch.arange(0, self.dim, 2, dtype=torch.float32, device=device) / self.dim
        return 1.0 / (self.rotary_base**exponent)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        freqs = position_ids.to(torch.float32).transpose(0, 1)[..., None] * self.inv_freq(position_ids.device)
        emb = torch.cat([freqs, freqs], dim=-1)  # [s, b, d]
        return emb[:, :, None, :]

    def tables(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ``[s, b, 1, d]`` in ``dtype`` for position ids ``[b, s]``, rounded as
        Megatron's unfused RoPE rounds them."""
        freqs = self(position_ids)
        return freqs.cos().to(dtype), freqs.sin().to(dtype)


def _rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Megatron's non-interleaved rotation ``t * cos + rotate_half(t) * sin`` over the first
    ``cos.shape[-1]`` channels, in the same order of operations."""
    rot = cos.shape[-1]
    x, rest = t[..., :rot], t[..., rot:]
    x1, x2 = torch.chunk(x, 2, dim=-1)
    out = (x * cos) + (torch.cat((-x2, x1), dim=-1) * sin)
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


_rope_fused = compiled_on_cuda(_rope)


def apply_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``t [s, b, heads, d]`` by the ``[s, b, 1, d_rot]`` tables (compiled on CUDA)."""
    return _rope_fused(t, cos, sin)


def sdar_position_ids(doc_ids: torch.Tensor, restart_per_document: bool) -> torch.Tensor:
    """Position ids ``[b, 2L]`` for ``[x_t ; x_0]``: the noised copy repeats the clean positions."""
    if restart_per_document:
        pos = positions_in_document(doc_ids)
    else:
        pos = torch.arange(doc_ids.shape[-1], device=doc_ids.device).expand_as(doc_ids)
    return torch.cat([pos, pos], dim=-1).to(torch.int64)
