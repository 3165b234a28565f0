"""The SDAR forward (noising) process: which clean tokens become the mask token.

One ``t`` is drawn per document of a packed window (or per block, as an option), uniformly in
``[t_min, t_max]`` (default ``[0, 1]``), turned into a masking probability
``p = (1 - eps) t + eps``, and every *eligible* token (all real tokens in continued pretraining,
response tokens only in SFT) is replaced by the mask token independently with probability ``p``.

A row with eligible tokens but no masked one would contribute nothing. ``EmptyRows.REDRAW``
(default) draws the row's ``t`` and masks again (up to ``tries`` times) and reports each token's
masking probability *given that the row has a masked token*, ``p / P(row has one)``, so the loss
weights ``1 / mask_prob`` stay unbiased (expected weight exactly one per eligible token); if every
try comes up empty, one eligible token is forced with probability ``1 / n_eligible``, its inclusion
probability, which keeps the estimate exact. ``EmptyRows.FORCE`` is the earlier behaviour: force
one token and keep its small ``p``, over-weighting rows with few eligible tokens (expected weight
per token ~1.5 at 8 eligible tokens).

All randomness comes from an explicit ``torch.Generator`` and the number of draws does not depend
on the data, so every tensor-parallel rank and pipeline stage that sees a sample draws exactly the
same noise for it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class EmptyRows(enum.StrEnum):
    """What a row with eligible tokens but no masked token gets."""

    REDRAW = "redraw"  # draw t and the masks again; weights conditioned on the row having one
    FORCE = "force"  # force one eligible token and keep its p (biased towards small rows)


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
    t_range: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """Per-token ``t ~ U(t_min, t_max)``, one value per document (or per block) of each row.

    Units are the maximal runs of equal document id (and block index), so a window's documents are
    numbered consecutively as packing produces them.
    """
    unit = NoiseUnit(unit)
    if unit is NoiseUnit.BLOCK and blocks is None:
        raise ValueError("per-block noise needs the block indices of each token")
    check_t_range(t_range)
    ids = _unit_ids(doc_ids, blocks if unit is NoiseUnit.BLOCK else None)
    batch, seq_len = doc_ids.shape
    draws = torch.rand((batch, seq_len), generator=generator, device=doc_ids.device, dtype=torch.float32)
    t_min, t_max = t_range
    if (t_min, t_max) != (0.0, 1.0):
        draws = t_min + (t_max - t_min) * draws
    return torch.gather(draws, 1, ids)


def check_t_range(t_range: tuple[float, float]) -> None:
    t_min, t_max = t_range
    if not 0.0 <= t_min < t_max <= 1.0:
        raise ValueError(f"the noise range must satisfy 0 <= t_min < t_max <= 1, got {t_min} {t_max}")


def apply_noise(
    tokens: torch.Tensor,
    eligible: torch.Tensor,
    doc_ids: torch.Tensor,
    mask_token_id: int,
    generator: torch.Generator | None = None,
    eps: float = 1e-3,
    unit: NoiseUnit | str = NoiseUnit.DOCUMENT,
    blocks: torch.Tensor | None = None,
    t_range: tuple[float, float] = (0.0, 1.0),
    empty_rows: EmptyRows | str = EmptyRows.REDRAW,
    tries: int = 10,
) -> NoisedBatch:
    """Mask eligible tokens of ``tokens`` ``[b, L]`` independently with probability ``p(t)``; see the
    module docstring for rows that draw no masked token."""
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"noise eps must be in [0, 1), got {eps}")
    if tokens.shape != eligible.shape or tokens.shape != doc_ids.shape:
        raise ValueError(
            f"tokens {tuple(tokens.shape)}, eligible {tuple(eligible.shape)} and doc_ids "
            f"{tuple(doc_ids.shape)} must have the same [batch, L] shape"
        )
    empty_rows = EmptyRows(empty_rows)
    if tries < 1:
        raise ValueError(f"tries must be >= 1, got {tries}")
    eligible = eligible.to(torch.bool)
    has_eligible = eligible.any(dim=-1, keepdim=True)

    def draw() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = sample_t(doc_ids, generator, unit, blocks, t_range)
        p = (1.0 - eps) * t + eps
        u = torch.rand(tokens.shape, generator=generator, device=tokens.device, dtype=torch.float32)
        return t, p, (u < p) & eligible

    t, p, masked = draw()
    mask_prob = p
    if empty_rows is EmptyRows.REDRAW:
        done = masked.any(dim=-1, keepdim=True) | ~has_eligible
        for _ in range(tries - 1):  # every try is drawn, so the stream does not depend on the data
            t_k, p_k, masked_k = draw()
            take = ~done
            t, p, masked = (
                torch.where(take, t_k, t),
                torch.where(take, p_k, p),
                torch.where(take, masked_k, masked),
            )
            done = done | masked_k.any(dim=-1, keepdim=True)
        # P(the row has a masked token) under the accepted draw's p, from sum(log(1 - p)) over eligible
        none = torch.exp(
            torch.where(eligible, torch.log1p(-p.clamp(max=1.0 - 1e-7)), 0.0).sum(-1, keepdim=True)
        )
        mask_prob = p / (1.0 - none).clamp_min(1e-12)
        mask_prob = torch.where(has_eligible, mask_prob.clamp(max=1.0), p)

    # Force one masked token in rows that have eligible tokens but none masked (after the tries).
    # The forced position is drawn uniformly among eligible ones (always drawn, like the tries).
    pick = torch.rand(tokens.shape, generator=generator, device=tokens.device, dtype=torch.float32)
    pick = torch.where(eligible, pick, torch.full_like(pick, -1.0))
    forced_pos = pick.argmax(dim=-1, keepdim=True)
    needs = (~masked.any(dim=-1, keepdim=True)) & has_eligible
    forced = torch.zeros_like(masked).scatter_(1, forced_pos, needs)
    masked = masked | forced
    if empty_rows is EmptyRows.REDRAW:  # the forced token's inclusion probability: 1 / n_eligible
        n_eligible = eligible.sum(dim=-1, keepdim=True).clamp_min(1).to(torch.float32)
        mask_prob = torch.where(forced, 1.0 / n_eligible, mask_prob)

    noised = torch.where(masked, torch.full_like(tokens, mask_token_id), tokens)
    return NoisedBatch(noised_tokens=noised, masked=masked, mask_prob=mask_prob, t=t)


def complement(
    noised: NoisedBatch, tokens: torch.Tensor, eligible: torch.Tensor, mask_token_id: int
) -> NoisedBatch:
    """The complementary copy of a noised sample: exactly the eligible tokens ``noised`` left clean
    are masked, so the pair supervises every eligible token once. Each token's masking probability
    is one minus the first copy's (reported floored at 1e-6 so never-masked tokens keep a finite
    weight), which keeps the copy's ``1 / p`` weights unbiased on their own."""
    eligible = eligible.to(torch.bool)
    masked = eligible & ~noised.masked
    mask_prob = (1.0 - noised.mask_prob).clamp_min(1e-6)
    out = torch.where(masked, torch.full_like(tokens, mask_token_id), tokens)
    return NoisedBatch(noised_tokens=out, masked=masked, mask_prob=mask_prob, t=noised.t)


def complementary_t_max(eps: float) -> float:
    """The largest ``t`` whose complement keeps a masking probability of at least ``eps``:
    ``1 - p(t) >= eps`` for ``p = (1 - eps) t + eps``."""
    return (1.0 - 2.0 * eps) / (1.0 - eps) if eps > 0 else 1.0
