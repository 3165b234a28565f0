"""SDAR attention masks over the 2L sequence ``[x_t ; x_0]``.

A query/key pair is described by its half (noised x_t or clean x_0), its position ``i`` inside the
L-long window, its document id and its block index. The rule (true = may attend):

* never across documents;
* noised -> noised: same block (bidirectional inside the block);
* noised -> clean: strictly earlier blocks;
* clean -> clean: same or earlier block (block-causal, default) or ``k <= q`` (fully causal variant);
* clean -> noised: never.

The per-token description travels through Megatron as a small integer *layout* tensor of shape
``[b, 2, L]`` (row 0: document ids, row 1: block indices) instead of a ``2L x 2L`` mask, so it survives
activation recompute and pipeline sends, and every layer derives the same mask from it. The data
pipeline produces ``[b, 2, L]``; ``SDARModel`` hands its layers ``[b, 3, L]``, the same two rows plus
the clean half's RoPE positions as row 2 (:func:`layout_with_positions`). The mask reads rows 0 and 1
only, so everything here that derives a mask takes either.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import torch

LAYOUT_DOC = 0
LAYOUT_BLOCK = 1
LAYOUT_POSITION = 2  # optional: RoPE positions, added by SDARModel so the core attention applies RoPE
LAYOUT_ROWS = 2  # [b, 2, L]: documents and blocks, what the data pipeline produces
LAYOUT_ROWS_WITH_POSITIONS = 3  # [b, 3, L]: plus the clean positions, what SDARModel gives its layers


class BlockCounting(enum.StrEnum):
    """Where block boundaries are counted from."""

    DOCUMENT = "document"  # from each document's first token (SDAR's SFT code)
    WINDOW = "window"  # from the window's first token, ``i // B``


class CleanAttention(enum.StrEnum):
    """How the clean half attends to itself."""

    BLOCK_CAUSAL = "block_causal"  # what inference sees; the SDAR paper and code
    CAUSAL = "causal"  # token-causal variant


def document_ids_from_eod(tokens: torch.Tensor, eod_token_id: int) -> torch.Tensor:
    """Document ids ``[b, L]`` for packed windows: an end-of-document token closes its document."""
    is_eod = (tokens == eod_token_id).to(torch.int32)
    # The document index increases on the token *after* each EOD.
    return torch.cumsum(is_eod, dim=-1, dtype=torch.int32) - is_eod


def document_ids_from_lengths(lengths: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Document ids ``[sum(lengths)]`` for documents of the given lengths, in order."""
    if any(n <= 0 for n in lengths):
        raise ValueError(f"document lengths must be positive, got {lengths}")
    ids = torch.arange(len(lengths), device=device, dtype=torch.int32)
    return torch.repeat_interleave(ids, torch.tensor(lengths, device=device))


def document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """For each token ``[b, L]``, the in-window index of its document's first token."""
    seq_len = doc_ids.shape[-1]
    idx = torch.arange(seq_len, device=doc_ids.device).expand_as(doc_ids)
    is_start = torch.ones_like(doc_ids, dtype=torch.bool)
    is_start[..., 1:] = doc_ids[..., 1:] != doc_ids[..., :-1]
    starts = torch.where(is_start, idx, torch.zeros_like(idx))
    return torch.cummax(starts, dim=-1).values


def positions_in_document(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token ``[b, L]`` counted from its document's first token."""
    idx = torch.arange(doc_ids.shape[-1], device=doc_ids.device).expand_as(doc_ids)
    return idx - document_starts(doc_ids)


def block_ids(doc_ids: torch.Tensor, block_size: int, counting: BlockCounting | str) -> torch.Tensor:
    """Block index of each token ``[b, L]``; compared only between tokens of one document."""
    counting = BlockCounting(counting)
    if block_size < 1:
        raise ValueError(f"block size must be >= 1, got {block_size}")
    if counting is BlockCounting.WINDOW:
        idx = torch.arange(doc_ids.shape[-1], device=doc_ids.device).expand_as(doc_ids)
        return (idx // block_size).to(torch.int32)
    return (positions_in_document(doc_ids) // block_size).to(torch.int32)


def make_layout(doc_ids: torch.Tensor, block_size: int, counting: BlockCounting | str) -> torch.Tensor:
    """The ``[b, 2, L]`` int32 layout tensor (document ids, block indices) that defines the mask."""
    if doc_ids.dim() != 2:
        raise ValueError(f"doc_ids must be [batch, L], got shape {tuple(doc_ids.shape)}")
    blocks = block_ids(doc_ids, block_size, counting)
    return torch.stack([doc_ids.to(torch.int32), blocks], dim=1).contiguous()


def layout_with_positions(layout: torch.Tensor, clean_positions: torch.Tensor) -> torch.Tensor:
    """The ``[b, 3, L]`` layout: ``layout`` ``[b, 2, L]`` plus the clean half's RoPE positions ``[b, L]``
    (the noised half repeats them)."""
    if layout.dim() != 3 or layout.shape[1] != LAYOUT_ROWS:
        raise ValueError(f"expected a [batch, 2, L] layout, got shape {list(layout.shape)}")
    if tuple(clean_positions.shape) != (layout.shape[0], layout.shape[-1]):
        raise ValueError(
            f"positions {list(clean_positions.shape)} do not match the layout's "
            f"{layout.shape[0]} rows x {layout.shape[-1]} tokens"
        )
    return torch.cat([layout, clean_positions.to(layout.dtype).unsqueeze(1)], dim=1)


def sdar_mask_rule(
    q_idx: torch.Tensor,
    kv_idx: torch.Tensor,
    q_doc: torch.Tensor,
    kv_doc: torch.Tensor,
    q_blk: torch.Tensor,
    kv_blk: torch.Tensor,
    seq_len: int,
    clean_attention: CleanAttention,
) -> torch.Tensor:
    """The SDAR rule on broadcastable index tensors over the 2L sequence (one definition for all)."""
    q_noised = q_idx < seq_len
    kv_noised = kv_idx < seq_len
    same_doc = q_doc == kv_doc
    noised_noised = q_noised & kv_noised & (q_blk == kv_blk)
    noised_clean = q_noised & ~kv_noised & (kv_blk < q_blk)
    if clean_attention is CleanAttention.CAUSAL:
        clean_ok = kv_idx <= q_idx
    else:
        clean_ok = kv_blk <= q_blk
    clean_clean = ~q_noised & ~kv_noised & clean_ok
    return same_doc & (noised_noised | noised_clean | clean_clean)


def sdar_mask_mod(layout: torch.Tensor, clean_attention: CleanAttention | str) -> Callable:
    """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` for the given ``[b, 2, L]`` or ``[b, 3, L]``
    layout."""
    clean_attention = CleanAttention(clean_attention)
    seq_len = layout.shape[-1]
    docs = layout[:, LAYOUT_DOC]
    blocks = layout[:, LAYOUT_BLOCK]

    def mask_mod(b, h, q_idx, kv_idx):
        q_pos = torch.where(q_idx < seq_len, q_idx, q_idx - seq_len)
        kv_pos = torch.where(kv_idx < seq_len, kv_idx, kv_idx - seq_len)
        return sdar_mask_rule(
            q_idx,
            kv_idx,
            docs[b, q_pos],
            docs[b, kv_pos],
            blocks[b, q_pos],
            blocks[b, kv_pos],
            seq_len,
            clean_attention,
        )

    return mask_mod


def dense_sdar_mask(layout: torch.Tensor, clean_attention: CleanAttention | str) -> torch.Tensor:
    """Boolean mask ``[b, 1, 2L, 2L]`` (true = may attend). For CPU and for reference only."""
    clean_attention = CleanAttention(clean_attention)
    seq_len = layout.shape[-1]
    idx = torch.arange(2 * seq_len, device=layout.device)
    doc2 = layout[:, LAYOUT_DOC].repeat(1, 2)
    blk2 = layout[:, LAYOUT_BLOCK].repeat(1, 2)
    mask = sdar_mask_rule(
        idx[:, None],
        idx[None, :],
        doc2[:, :, None],
        doc2[:, None, :],
        blk2[:, :, None],
        blk2[:, None, :],
        seq_len,
        clean_attention,
    )
    return mask.unsqueeze(1)
