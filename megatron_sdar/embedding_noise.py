"""Gaussian noise on the mask token's input embedding, a stabiliser for the first iterations.

A converted AR model has never seen the mask token: its embedding row starts untrained (the importer
adds it), every masked position feeds the same vector into the first layer, and LLaDA2.0 reports
gradient spikes early in conversion from that. Their remedy, adopted here as an option
(``--sdar-mask-embedding-noise-std`` / ``-iters``): add ``N(0, std^2)`` noise to the embedding output
at the masked positions during the first iterations, so masked positions differ from one another
while the row learns.

The noise must be the same on every tensor-parallel rank (each holds the whole hidden vector, or its
sequence-parallel shard) and reproducible on resume. It is drawn from a generator seeded by
:func:`noise_seed` ``(seed, iteration, micro-batch, data-parallel rank)`` for the whole
``[2L, b, h]`` sequence, and each rank keeps the positions it holds: a context-parallel rank its
chunks, a sequence-parallel rank the ``r``-th of ``tp`` equal shards of those.
"""

from __future__ import annotations

import torch

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constants mixing the seed's parts (splitmix64)
_MASK64 = (1 << 64) - 1


def noise_seed(seed: int, iteration: int, micro_batch: int, data_parallel_rank: int) -> int:
    """A 63-bit seed that differs for every (run seed, iteration, micro-batch, data-parallel rank)."""
    value = 0
    for part in (seed, iteration, micro_batch, data_parallel_rank):
        value = (value ^ (part & _MASK64)) * _MIX & _MASK64
        value ^= value >> 31
    return value & ((1 << 63) - 1)


def add_mask_embedding_noise(
    embedded: torch.Tensor,
    input_ids: torch.Tensor,
    mask_token_id: int,
    std: float,
    seed: int,
    shard: tuple[int, int] = (0, 1),
    sequence_index: torch.Tensor | None = None,
    sequence_length: int | None = None,
) -> torch.Tensor:
    """``embedded`` plus ``std`` times standard normal noise at the positions holding the mask token.

    ``embedded`` is the embedding output ``[s / n, b, h]`` for shard ``shard = (rank, n)`` of the
    sequence (``(0, 1)``: the whole sequence); ``input_ids`` ``[b, s]`` is the whole sequence. The
    noise is drawn in float32 for ``[sequence_length, b, h]`` from ``seed`` on ``embedded``'s device,
    and the ``s`` tokens take its rows ``sequence_index`` (default: the ``s`` tokens are the whole
    sequence, in order; a context-parallel rank's tokens are some of its positions), so every shard
    and rank of the same ``seed`` takes its part of one draw. The result keeps ``embedded``'s dtype;
    the gradient passes through unchanged.
    """
    rank, shards = shard
    batch, seq = input_ids.shape
    if seq % shards or embedded.shape[0] * shards != seq or embedded.shape[1] != batch:
        raise ValueError(
            f"embedding output {list(embedded.shape)} is not shard {rank} of {shards} of a "
            f"{seq}-token sequence of {batch} rows"
        )
    if (sequence_index is None) != (sequence_length is None):
        raise ValueError("sequence_index and sequence_length go together")
    if std <= 0:
        return embedded
    local = seq // shards
    device = embedded.device
    if sequence_index is None:
        sequence_index, sequence_length = torch.arange(seq, device=device), seq
    rows = sequence_index.to(device)[rank * local : (rank + 1) * local]
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    noise = torch.randn(
        (sequence_length, batch, embedded.shape[-1]), generator=generator, device=device, dtype=torch.float32
    ).index_select(0, rows)
    masked = (input_ids.t()[rank * local : (rank + 1) * local] == mask_token_id).unsqueeze(-1)
    return embedded + (noise * std * masked).to(embedded.dtype)
