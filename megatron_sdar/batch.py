"""Turn clean windows into the SDAR model inputs: ``[x_t ; x_0]``, positions, layout, loss terms."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from megatron_sdar.config import DocumentMask, PositionIds, SDARConfig
from megatron_sdar.masks import BlockCounting, make_layout
from megatron_sdar.noise import NoisedBatch, apply_noise, complement, complementary_t_max
from megatron_sdar.positions import sdar_position_ids


@dataclass(frozen=True)
class BatchField:
    """One field of an SDAR micro-batch: its dtype and its shape in terms of ``b`` and ``L``."""

    name: str
    dtype: torch.dtype
    dims: tuple[str | int, ...]  # "b", "L", "2L" or a fixed size
    reused: bool  # masks or RoPE tables are derived from it: a repeat keeps its device tensor

    def shape(self, batch: int, seq_length: int) -> tuple[int, ...]:
        sizes = {"b": batch, "L": seq_length, "2L": 2 * seq_length}
        return tuple(sizes[d] if isinstance(d, str) else d for d in self.dims)


def _field(dtype: torch.dtype, *dims: str | int, reused: bool = False) -> Any:
    return field(metadata={"dtype": dtype, "dims": dims, "reused": reused})


@dataclass
class SDARBatch:
    """Everything one SDAR micro-batch needs; ``L`` is the clean window length.

    The one definition of the batch: each field's dtype and shape are declared here, and the
    dataset's samples, the host-to-device copy, the reuse of repeated packings and the
    tensor-parallel agreement check all derive from :data:`BATCH_FIELDS`.
    """

    input_ids: torch.Tensor = _field(torch.int64, "b", "2L")  # x_t then x_0
    position_ids: torch.Tensor = _field(torch.int64, "b", "2L", reused=True)  # noised copy = clean positions
    # document ids, block indices; SDARModel appends the RoPE positions for its layers ([b, 3, L])
    layout: torch.Tensor = _field(torch.int32, "b", 2, "L", reused=True)
    labels: torch.Tensor = _field(torch.int64, "b", "L")  # x_0, predicted at the same position (no shift)
    eligible: torch.Tensor = _field(torch.bool, "b", "L")  # tokens the noise may mask
    masked: torch.Tensor = _field(torch.bool, "b", "L")  # tokens the noise did mask
    mask_prob: torch.Tensor = _field(torch.float32, "b", "L")  # p per position
    t: torch.Tensor = _field(torch.float32, "b", "L")  # t per position

    def sample(self, row: int) -> dict[str, torch.Tensor]:
        """Row ``row`` as a dataset sample (a data loader stacks samples back into a batch)."""
        return {f.name: getattr(self, f.name)[row] for f in BATCH_FIELDS}

    @classmethod
    def from_mapping(cls, data: Mapping[str, torch.Tensor]) -> SDARBatch:
        """The batch from a mapping with (at least) every field, e.g. a data loader's output."""
        missing = [f.name for f in BATCH_FIELDS if f.name not in data]
        if missing:
            raise ValueError(f"the micro-batch lacks the SDAR fields {missing}")
        return cls(**{f.name: data[f.name] for f in BATCH_FIELDS})


BATCH_FIELDS: tuple[BatchField, ...] = tuple(
    BatchField(f.name, f.metadata["dtype"], f.metadata["dims"], f.metadata["reused"])
    for f in fields(SDARBatch)
)


def check_batch_shapes(data: Mapping[str, torch.Tensor], batch: int, seq_length: int) -> None:
    """Raise ``ValueError`` naming the flags when a micro-batch does not have the expected shapes."""
    for f in BATCH_FIELDS:
        expected = f.shape(batch, seq_length)
        if f.name not in data or tuple(data[f.name].shape) != expected:
            got = list(data[f.name].shape) if f.name in data else "nothing"
            raise ValueError(
                f"micro-batch field {f.name!r} has shape {got}, expected {list(expected)} "
                f"from --micro-batch-size {batch} and --seq-length {seq_length}"
            )


def build_sdar_batch(
    tokens: torch.Tensor,
    doc_ids: torch.Tensor,
    eligible: torch.Tensor,
    config: SDARConfig,
    generator: torch.Generator | list[torch.Generator] | None = None,
    complementary: bool = False,
) -> SDARBatch:
    """Noise ``tokens`` ``[b, L]`` (documents given by ``doc_ids``) and lay out the 2L input.

    ``generator`` may be one generator for the whole batch or one per row (so a sample's noise can
    depend on the sample alone, not on which micro-batch it landed in). ``complementary`` gives the
    complementary copy of the noise the same generator would draw (``config.complementary_masks``).
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [batch, L], got shape {tuple(tokens.shape)}")
    seq_len = tokens.shape[-1]
    if seq_len % config.block_size != 0:
        raise ValueError(
            f"window length {seq_len} is not a multiple of the SDAR block size {config.block_size}"
        )
    tokens = tokens.to(torch.int64)
    if config.document_mask is DocumentMask.GLOBAL:  # one document per window; padding stays apart
        pad_doc = doc_ids.amax(dim=-1, keepdim=True) + 1
        mask_docs = torch.where(eligible.to(torch.bool) | (doc_ids != pad_doc - 1), 0, 1)
        layout = make_layout(mask_docs, config.block_size, BlockCounting.WINDOW)
    else:
        layout = make_layout(doc_ids, config.block_size, config.block_counting)
    t_range = config.noise_range
    if config.complementary_masks:  # both copies keep a masking probability of at least eps
        t_range = (t_range[0], min(t_range[1], complementary_t_max(config.noise_eps)))
    noise_args = dict(
        mask_token_id=config.mask_token_id, eps=config.noise_eps, unit=config.noise_unit,
        t_range=t_range, empty_rows=config.empty_rows,
    )  # fmt: skip
    if isinstance(generator, list):
        if len(generator) != tokens.shape[0]:
            raise ValueError(f"got {len(generator)} generators for {tokens.shape[0]} rows")
        rows = [
            apply_noise(
                tokens[i : i + 1], eligible[i : i + 1], doc_ids[i : i + 1], generator=g,
                blocks=layout[i : i + 1, 1], **noise_args,
            )
            for i, g in enumerate(generator)
        ]  # fmt: skip
        noised = NoisedBatch(*(torch.cat([getattr(r, f.name) for r in rows]) for f in fields(NoisedBatch)))
    else:
        noised = apply_noise(
            tokens, eligible, doc_ids, generator=generator, blocks=layout[:, 1], **noise_args
        )
    if complementary:
        noised = complement(noised, tokens, eligible, config.mask_token_id)
    return SDARBatch(
        input_ids=torch.cat([noised.noised_tokens, tokens], dim=-1),
        position_ids=sdar_position_ids(doc_ids, config.position_ids is PositionIds.DOCUMENT),
        layout=layout,
        labels=tokens,
        eligible=eligible.to(torch.bool),
        masked=noised.masked,
        mask_prob=noised.mask_prob,
        t=noised.t,
    )
