"""Context parallelism (CP) for the 2L SDAR sequence: which positions a CP rank holds, the slicing of
a micro-batch for it, and the gather of keys and values across the CP group.

The clean window ``0..L-1`` is cut into ``2 cp`` equal chunks; rank ``r`` holds chunks ``r`` and
``2 cp - 1 - r`` (the zig-zag assignment causal CP uses), of **both** halves: the noised tokens and
the clean tokens at those positions, ``2L / cp`` tokens in the order ``[x_t chunks ; x_0 chunks]``.
SDAR attention is causal-shaped at chunk granularity (a query sees keys of its own and earlier
positions, never later ones), so every rank gets the same number of allowed (query, key) pairs up to
one chunk.

Attention runs each rank's local queries against the keys a query of theirs may see (:class:`CPPlan`):
the clean keys and values of the whole window, all-gathered over the CP group (the backward
reduce-scatters their gradients), its own noised keys, and the noised keys within ``B - 1``
positions of its chunks held by other ranks (a noised query sees only its own block, of at most
``B`` positions, so no other noised key can be visible), taken from an all-gather of every rank's
chunk edges. The SDAR mask is evaluated at global indices, so blocks and documents may cross chunk
boundaries. Everything else is per token and needs no communication; the loss terms are sums that
Megatron reduces over the data- and context-parallel ranks with ``--calculate-per-token-loss``.

The data loader of every CP rank reads the whole micro-batch (the noise is drawn per whole window,
from the sample's seeded generator, so it matches CP=1 exactly), and :func:`slice_micro_batch` keeps
this rank's part on the host, before the copy to the device. The position ids and the layout stay
whole: they are small, and every rank needs the documents and blocks of all keys.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import torch

# [b, L] fields cut to this rank's positions; input_ids ([b, 2L]) is cut to both halves' positions
PER_POSITION_FIELDS = ("labels", "eligible", "masked", "mask_prob", "t")


def cp_problems(seq_length: int, cp_size: int, block_size: int = 1) -> list[str]:
    """Why ``--seq-length`` cannot be split over ``cp_size`` context-parallel ranks, if it cannot
    (``block_size``: the largest block a batch may hold, which a chunk must be able to contain)."""
    if cp_size == 1:
        return []
    if seq_length % (2 * cp_size):
        return [
            f"--context-parallel-size {cp_size} cuts the window into {2 * cp_size} equal chunks "
            f"(two per rank, zig-zag), so --seq-length must be a multiple of {2 * cp_size}, got {seq_length}"
        ]
    if seq_length // (2 * cp_size) < block_size:
        return [
            f"--context-parallel-size {cp_size} cuts --seq-length {seq_length} into chunks of "
            f"{seq_length // (2 * cp_size)} positions, shorter than the block size {block_size}: use a "
            "longer window or a smaller context-parallel size"
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


@dataclasses.dataclass(frozen=True)
class CPPlan:
    """What context-parallel rank ``rank`` exchanges and attends, for windows of ``seq_len`` and
    blocks of at most ``halo + 1`` positions (index tensors on the CPU; :meth:`to` moves them).

    * ``query_index``: its ``2L / cp`` tokens' indices in the ``2L`` sequence (noised, then clean);
    * ``edge_rows``: the rows of its noised half it contributes to the edge all-gather (the first
      and last ``halo`` positions of each chunk), the same count on every rank;
    * ``halo_rows``: which rows of the gathered edges (rank-major) are the noised positions within
      ``halo`` of its chunks that other ranks hold, each once;
    * ``clean_order``: the rows of the gathered clean halves (rank-major) in position order;
    * ``key_index``: the keys' indices in the ``2L`` sequence, in the order attention sees them: its
      noised tokens, the halo, every clean position.
    """

    query_index: torch.Tensor
    edge_rows: torch.Tensor
    halo_rows: torch.Tensor
    clean_order: torch.Tensor
    key_index: torch.Tensor

    def to(self, device: Any) -> CPPlan:
        return CPPlan(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))


@functools.cache
def _plan(seq_len: int, cp_size: int, rank: int, halo: int) -> CPPlan:
    chunk = seq_len // (2 * cp_size)
    if halo >= chunk:
        raise ValueError(cp_problems(seq_len, cp_size, halo + 1)[0])
    edges = sorted({*range(halo), *range(chunk - halo, chunk)})  # rows of one chunk
    edge_rows = torch.tensor(edges + [chunk + e for e in edges], dtype=torch.long)
    holder = {}  # position -> row in the gathered edges (rank-major), first occurrence
    for r in range(cp_size):
        for i, p in enumerate(_positions(seq_len, cp_size, r)[edge_rows].tolist()):
            holder.setdefault(p, r * len(edge_rows) + i)
    own = _positions(seq_len, cp_size, rank)
    held = set(own.tolist())
    near = set()
    for start in (own[0].item(), own[chunk].item()):
        near.update(range(max(start - halo, 0), start))
        near.update(range(start + chunk, min(start + chunk + halo, seq_len)))
    halo_positions = sorted(near - held)
    clean = torch.cat([_positions(seq_len, cp_size, r) for r in range(cp_size)])
    return CPPlan(
        query_index=torch.cat([own, own + seq_len]),
        edge_rows=edge_rows,
        halo_rows=torch.tensor([holder[p] for p in halo_positions], dtype=torch.long),
        clean_order=torch.argsort(clean),
        key_index=torch.cat(
            [own, torch.tensor(halo_positions, dtype=torch.long), torch.arange(seq_len) + seq_len]
        ),
    )


def cp_plan(seq_len: int, cp_size: int, rank: int, halo: int, device: Any = None) -> CPPlan:
    """The :class:`CPPlan` of rank ``rank`` on ``device`` (cached per arguments: every layer of every
    micro-batch asks for it, and the copy to the device is made once)."""
    return _plan_on(seq_len, cp_size, rank, halo, None if device is None else torch.device(device))


@functools.cache
def _plan_on(seq_len: int, cp_size: int, rank: int, halo: int, device: torch.device | None) -> CPPlan:
    return _plan(seq_len, cp_size, rank, halo).to(device)


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


def gather_rows(local: torch.Tensor, group: Any) -> torch.Tensor:
    """Every rank's ``local`` (same shape) stacked rank-major along the first dimension; in backward
    each rank receives the sum of the gradients of its rows over the group."""
    return _GatherRows.apply(local, group)


def attended_keys(tensor: torch.Tensor, plan: CPPlan, group: Any) -> torch.Tensor:
    """The keys (or values) of ``plan.key_index`` from this rank's ``[2L / cp, ...]`` ones: its noised
    rows, the halo from the gathered chunk edges, and the gathered clean halves in position order."""
    half = tensor.shape[0] // 2
    noised, clean = tensor[:half], tensor[half:]
    edges = gather_rows(noised.index_select(0, plan.edge_rows), group)
    everyone = gather_rows(clean, group)
    return torch.cat(
        [noised, edges.index_select(0, plan.halo_rows), everyone.index_select(0, plan.clean_order)]
    )


def block_size_problem(layout: torch.Tensor, bound: int) -> str | None:
    """Why ``layout`` ``[b, 2+, L]`` cannot be split by context parallelism with blocks of at most
    ``bound`` positions (a longer block), if it cannot. Runs where the layout is (the host)."""
    docs, blocks = layout[:, 0], layout[:, 1]
    change = torch.ones_like(docs, dtype=torch.bool)
    change[:, 1:] = (docs[:, 1:] != docs[:, :-1]) | (blocks[:, 1:] != blocks[:, :-1])
    # every row starts a run, so the runs of the flattened rows never cross a row's end
    starts = change.reshape(-1).nonzero().squeeze(1)
    ends = torch.cat([starts[1:], starts.new_tensor([change.numel()])])
    longest = int((ends - starts).max()) if starts.numel() else 0
    if longest > bound:
        return (
            f"a micro-batch holds a block of {longest} positions, longer than the largest block size "
            f"{bound} the model was built for; context parallelism exchanges the noised keys within that "
            "distance only: pass the block sizes the data was built with (--sdar-block-size, "
            "--sdar-block-size-schedule)"
        )
    return None


def context_parallel_rank_and_size() -> tuple[int, int]:
    """``(rank, size)`` in Megatron's context-parallel group (``(0, 1)`` when it is not set up)."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 0, 1
    return parallel_state.get_context_parallel_rank(), parallel_state.get_context_parallel_world_size()
