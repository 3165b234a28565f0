"""Rotary position embeddings driven by explicit position ids.

Megatron's stock ``RotaryEmbedding`` always rotates by ``0..seq_len-1``. SDAR needs the noised copy
``x_t`` to carry the clean copy's positions (and, for SFT packing, positions that restart per
document), so the table is computed from the ``[b, 2L]`` position ids instead. The result has the
``[s, b, 1, d]`` shape that Megatron's ``apply_rotary_pos_emb`` broadcasts over heads.
"""

from __future__ import annotations

import torch
from torch import nn

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


def sdar_position_ids(doc_ids: torch.Tensor, restart_per_document: bool) -> torch.Tensor:
    """Position ids ``[b, 2L]`` for ``[x_t ; x_0]``: the noised copy repeats the clean positions."""
    if restart_per_document:
        pos = positions_in_document(doc_ids)
    else:
        pos = torch.arange(doc_ids.shape[-1], device=doc_ids.device).expand_as(doc_ids)
    return torch.cat([pos, pos], dim=-1).to(torch.int64)
