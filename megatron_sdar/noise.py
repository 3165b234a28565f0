"""The SDAR forward (noising) process: which clean tokens become the mask token.

One ``t ~ U(0, 1)`` is drawn per document of a packed window (or per block, as an option), turned
into a masking probability ``p = (1 - eps) t + eps``, and every *eligible* token (all real tokens in
continued pretraining, response tokens only in SFT) is replaced by the mask token independently with
probability ``p``. Rows with eligible tokens but no masked one get one eligible token forced, so no
micro-batch row contributes an empty loss.

All randomness comes from an explicit ``torch.Generator`` so that every tensor-parallel rank and
pipeline stage that sees a sample draws exactly the same noise for it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class NoiseUnit(enum.StrEnum):
    """What one draw of ``t`` covers."""

    DOCUMENT = "document"
    BLOCK = "block"


@dataclass
class NoisedBatch:
    """Result of :func:`apply_noise`; every tensor is ``[b, L]``."""

    noised_tokens: torch.Tensor  # x_t
    masked: torch.Tensor  # bool: position replaced by the mask token
    mask_prob: torch.Tensor  # float32 p at each position (defined everywhere)
    t: torch.Tensor  # float32 t at each position


def _unit_ids(doc_ids: torch.Tensor, blocks: torch.Tensor | None) -> torch.Tensor:
    """Dense ids 0..n-1 per row for the noise unit (runs of one document, or of one block)."""
    changed = torch.ones_like(doc_ids, dtype=torch.bool)
    changed[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    if blocks is not None:
        changed[:, 1:] |= blocks[:, 1:] != blocks[:, :-1]
    return torch.cumsum(changed.to(torch.int64), dim=-1) - 1


def sample_t(
    doc_ids: torch.Tensor,
    generator: torch.Generator | None,
    unit: NoiseUnit | str = NoiseUnit.DOCUMENT,
    blocks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token ``t ~ U(0, 1)``, one value per document (or per block) of each row.

    Units are the maximal runs of equal document id (and block index), so a window's documents are
    numbered consecutively as packing produces them.
    """
    unit = NoiseUnit(unit)
    if unit is NoiseUnit.BLOCK and blocks is None:
        raise ValueError("per-block noise needs the block indices of each token")
    ids = _unit_ids(doc_ids, blocks if unit is NoiseUnit.BLOCK else None)
    batch, seq_len = doc_ids.shape
    draws = torch.rand((batch, seq_len), generator=generator, device=doc_ids.device, dtype=torch.float32)
    return torch.gather(draws, 1, ids)


def apply_noise(
    tokens: torch.Tensor,
    eligible: torch.Tensor,
    doc_ids: torch.Tensor,
    mask_token_id: int,
    generator: torch.Generator | None = None,
    eps: float = 1e-3,
    unit: NoiseUnit | str = NoiseUnit.DOCUMENT,
    blocks: torch.Tensor | None = None,
) -> NoisedBatch:
    """Mask eligible tokens of ``tokens`` ``[b, L]`` independently with probability ``p(t)``."""
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"noise eps must be in [0, 1), got {eps}")
    if tokens.shape != eligible.shape or tokens.shape != doc_ids.shape:
        raise ValueError(
            f"tokens {tuple(tokens.shape)}, eligible {tuple(eligible.shape)} and doc_ids "
            f"{tuple(doc_ids.shape)} must have the same [batch, L] shape"
        )
    eligible = eligible.to(torch.bool)
    t = sample_t(doc_ids, generator, unit, blocks)
    p = (1.0 - eps) * t + eps
    u = torch.rand(tokens.shape, generator=generator, device=tokens.device, dtype=torch.float32)
    masked = (u < p) & eligible

    # Force one masked token in rows that have eligible tokens but drew none. The forced position is
    # drawn uniformly among eligible ones (always drawn, so the random stream does not depend on data).
    pick = torch.rand(tokens.shape, generator=generator, device=tokens.device, dtype=torch.float32)
    pick = torch.where(eligible, pick, torch.full_like(pick, -1.0))
    forced_pos = pick.argmax(dim=-1, keepdim=True)
    needs = (~masked.any(dim=-1, keepdim=True)) & eligible.any(dim=-1, keepdim=True)
    forced = torch.zeros_like(masked).scatter_(1, forced_pos, needs)
    masked = masked | forced

    noised = torch.where(masked, torch.full_like(tokens, mask_token_id), tokens)
    return NoisedBatch(noised_tokens=noised, masked=masked, mask_prob=p, t=t)
