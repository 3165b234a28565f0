"""Context parallelism (CP) for the 2L SDAR sequence: which positions a CP rank holds, the slicing of
a micro-batch for it, and the gather of keys and values across the CP group.

The clean window ``0..L-1`` is cut into ``2 cp`` equal chunks; rank ``r`` holds chunks ``r`` and
``2 cp - 1 - r`` (the zig-zag assignment causal CP uses), of **both** halves: the noised tokens and
the clean tokens at those positions, ``2L / cp`` tokens in the order ``[x_t chunks ; x_0 chunks]``.
SDAR attention is causal-shaped at chunk granularity (a query sees keys of its own and earlier
positions, never later ones), so every rank gets the same number of allowed (query, key) pairs up to
one chunk.

Attention runs each rank's local queries against the keys and values of the whole sequence,
all-gathered over the CP group (the backward reduce-scatters their gradients), under the SDAR mask
evaluated on global indices: exact for any packing, block size and block counting, since no
assumption about where blocks or documents start is needed. Everything else is per token and needs
no communication; the loss terms are sums that Megatron reduces over the data- and context-parallel
ranks with ``--calculate-per-token-loss``.

The data loader of every CP rank reads the whole micro-batch (the noise is drawn per whole window,
from the sample's seeded generator, so it matches CP=1 exactly), and :func:`slice_micro_batch` keeps
this rank's part on the host, before the copy to the device. The position ids and the layout stay
whole: they are small, and every rank needs the documents and blocks of all keys.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch

# [b, L] fields cut to this rank's positions; input_ids ([b, 2L]) is cut to both halves' positions
PER_POSITION_FIELDS = ("labels", "eligible", "masked", "mask_prob", "t")


def cp_problems(seq_length: int, cp_size: int) -> list[str]:
    """Why ``--seq-length`` cannot be split over ``cp_size`` context-parallel ranks, if it cannot."""
    if cp_size > 1 and seq_length % (2 * cp_size):
        return [
            f"--context-parallel-size {cp_size} cuts the window into {2 * cp_size} equal chunks "
            f"(two per rank, zig-zag), so --seq-length must be a multiple of {2 * cp_size}, got {seq_length}"
        ]
    return []


@functools.cache
def _positions(seq_len: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    if seq_len % (2 * cp_size):
        raise ValueError(cp_problems(seq_len, cp_size)[0])
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"context-parallel rank {cp_rank} is outside [0, {cp_size})")
    chunk = seq_len // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * chunk, (2 * cp_size - cp_rank) * chunk)
    return torch.cat([first, second])


def clean_positions(seq_len: int, cp_size: int, cp_rank: int, device: Any = None) -> torch.Tensor:
    """The clean positions (ascending, ``L / cp`` of them) that rank ``cp_rank`` holds."""
    return _positions(seq_len, cp_size, cp_rank).to(device)


def sequence_index(seq_len: int, cp_size: int, cp_rank: int, device: Any = None) -> torch.Tensor:
    """Indices into the ``2L`` sequence ``[x_t ; x_0]`` of the rank's ``2L / cp`` tokens, in its order:
    its noised tokens, then its clean tokens."""
    positions = _positions(seq_len, cp_size, cp_rank)
    return torch.cat([positions, positions + seq_len]).to(device)


@functools.cache
def _global_order(seq_len: int, cp_size: int) -> torch.Tensor:
    gathered = torch.cat([sequence_index(seq_len, cp_size, r) for r in range(cp_size)])
    return torch.argsort(gathered)


def global_order(seq_len: int, cp_size: int, device: Any = None) -> torch.Tensor:
    """For the rank-major concatenation of every rank's tokens, the row holding each of the ``2L``
    sequence positions: ``gathered[global_order]`` is the sequence in its own order."""
    return _global_order(seq_len, cp_size).to(device)


def slice_micro_batch(
    host: Mapping[str, torch.Tensor], cp_size: int, cp_rank: int
) -> dict[str, torch.Tensor]:
    """This rank's part of a whole micro-batch (``SDARBatch`` fields, ``[b, L]`` / ``[b, 2L]``):
    ``input_ids`` at :func:`sequence_index`, the per-position fields at :func:`clean_positions`;
    the position ids, the layout and anything else are kept whole."""
    seq_len = host["labels"].shape[-1]
    out = dict(host)
    positions = clean_positions(seq_len, cp_size, cp_rank)
    out["input_ids"] = host["input_ids"].index_select(-1, sequence_index(seq_len, cp_size, cp_rank))
    for name in PER_POSITION_FIELDS:
        out[name] = host[name].index_select(-1, positions)
    return out


class _GatherRows(torch.autograd.Function):
    """All-gather along the first dimension; backward: reduce-scatter (each rank's rows get the sum
    of their gradients over the group). On the input's device, so the CPU (gloo) path works too."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        size = torch.distributed.get_world_size(group)
        local = local.contiguous()
        out = local.new_empty((size * local.shape[0], *local.shape[1:]))
        torch.distributed.all_gather_into_tensor(out, local, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        size = torch.distributed.get_world_size(ctx.group)
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // size, *grad.shape[1:]))
        torch.distributed.reduce_scatter_tensor(out, grad, group=ctx.group)
        return out, None


def gather_sequence(local: torch.Tensor, seq_len: int, group: Any) -> torch.Tensor:
    """``[2L, ...]`` in sequence order from every rank's ``[2L / cp, ...]`` (first dimension); in
    backward each rank receives the sum of the gradients of its rows over the group."""
    cp_size = torch.distributed.get_world_size(group)
    gathered = _GatherRows.apply(local, group)
    return gathered.index_select(0, global_order(seq_len, cp_size, local.device))


def context_parallel_rank_and_size() -> tuple[int, int]:
    """``(rank, size)`` in Megatron's context-parallel group (``(0, 1)`` when it is not set up)."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 0, 1
    return parallel_state.get_context_parallel_rank(), parallel_state.get_context_parallel_world_size()
