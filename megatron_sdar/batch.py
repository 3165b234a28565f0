"""Turn clean windows into the SDAR model inputs: ``[x_t ; x_0]``, positions, layout, loss terms."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from megatron_sdar.config import PositionIds, SDARConfig
from megatron_sdar.masks import make_layout
from megatron_sdar.noise import NoisedBatch, apply_noise
from megatron_sdar.positions import sdar_position_ids


@dataclass
class SDARBatch:
    """Everything one SDAR micro-batch needs; ``L`` is the clean window length."""

    input_ids: torch.Tensor  # [b, 2L] int64: x_t then x_0
    position_ids: torch.Tensor  # [b, 2L] int64: the noised copy repeats the clean positions
    layout: torch.Tensor  # [b, 2, L] int32: document ids and block indices (the attention mask)
    labels: torch.Tensor  # [b, L] int64: x_0, predicted at the same position (no shift)
    eligible: torch.Tensor  # [b, L] bool: tokens the noise may mask
    masked: torch.Tensor  # [b, L] bool: tokens the noise did mask
    mask_prob: torch.Tensor  # [b, L] float32: p per position
    t: torch.Tensor  # [b, L] float32: t per position


def build_sdar_batch(
    tokens: torch.Tensor,
    doc_ids: torch.Tensor,
    eligible: torch.Tensor,
    config: SDARConfig,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> SDARBatch:
    """Noise ``tokens`` ``[b, L]`` (documents given by ``doc_ids``) and lay out the 2L input.

    ``generator`` may be one generator for the whole batch or one per row (so a sample's noise can
    depend on the sample alone, not on which micro-batch it landed in).
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [batch, L], got shape {tuple(tokens.shape)}")
    seq_len = tokens.shape[-1]
    if seq_len % config.block_size != 0:
        raise ValueError(
            f"window length {seq_len} is not a multiple of the SDAR block size {config.block_size}"
        )
    tokens = tokens.to(torch.int64)
    layout = make_layout(doc_ids, config.block_size, config.block_counting)
    noise_args = dict(mask_token_id=config.mask_token_id, eps=config.noise_eps, unit=config.noise_unit)
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
