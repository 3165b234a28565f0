"""SDAR settings that sit beside Megatron's ``TransformerConfig``, with up-front validation."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from megatron_sdar.masks import BlockCounting, CleanAttention
from megatron_sdar.noise import NoiseUnit

ATTENTION_BACKENDS = ("auto", "flex", "split", "sdpa")


class LossNormalizer(enum.StrEnum):
    """What the summed, 1/p-weighted masked cross-entropy is divided by (globally)."""

    ELIGIBLE = "eligible"  # tokens that could be masked (released SDAR code)
    MASKED = "masked"  # tokens that were masked (older choice)


class PositionIds(enum.StrEnum):
    """RoPE positions of a packed window."""

    CONTINUOUS = "continuous"  # 0..L-1 across documents (Megatron pretraining)
    DOCUMENT = "document"  # restart at 0 per document (SDAR's SFT code)


@dataclass
class SDARConfig:
    """The block-diffusion objective's settings."""

    block_size: int = 4
    mask_token_id: int = -1
    noise_eps: float = 1e-3
    noise_unit: NoiseUnit = NoiseUnit.DOCUMENT
    loss_normalizer: LossNormalizer = LossNormalizer.ELIGIBLE
    clean_attention: CleanAttention = CleanAttention.BLOCK_CAUSAL
    block_counting: BlockCounting = BlockCounting.DOCUMENT
    position_ids: PositionIds = PositionIds.CONTINUOUS
    attention_backend: str = "auto"
    flex_kernel_options: dict | None = None  # FlexAttention kernel_options (tile sizes, warps, ...)

    def __post_init__(self) -> None:
        self.noise_unit = NoiseUnit(self.noise_unit)
        self.loss_normalizer = LossNormalizer(self.loss_normalizer)
        self.clean_attention = CleanAttention(self.clean_attention)
        self.block_counting = BlockCounting(self.block_counting)
        self.position_ids = PositionIds(self.position_ids)

    def validate(
        self,
        seq_length: int,
        vocab_size: int | None = None,
        special_token_ids: dict[str, int] | None = None,
    ) -> None:
        """Raise ``ValueError`` saying what to change when the settings cannot work together.

        Token checks run only when ``vocab_size`` is known (after the tokenizer is built).
        """
        if self.block_size < 1:
            raise ValueError(f"--sdar-block-size must be >= 1, got {self.block_size}")
        if seq_length % self.block_size != 0:
            raise ValueError(
                f"sequence length {seq_length} is not a multiple of the SDAR block size "
                f"{self.block_size}; pick --seq-length as a multiple of --sdar-block-size "
                f"(e.g. {seq_length - seq_length % self.block_size or self.block_size})"
            )
        if not 0.0 <= self.noise_eps < 1.0:
            raise ValueError(f"--sdar-noise-eps must be in [0, 1), got {self.noise_eps}")
        if self.flex_kernel_options is not None and not isinstance(self.flex_kernel_options, dict):
            raise ValueError(
                f"--sdar-flex-kernel-options must be a JSON object, got {self.flex_kernel_options!r}"
            )
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"unknown SDAR attention backend {self.attention_backend!r}; use one of {ATTENTION_BACKENDS}"
            )
        if vocab_size is None:
            return
        if not 0 <= self.mask_token_id < vocab_size:
            raise ValueError(
                f"mask token id {self.mask_token_id} is outside the vocabulary [0, {vocab_size}); "
                "set --sdar-mask-token-id to an unused token (Qwen3: 151669 '<|MASK|>')"
            )
        for name, token_id in (special_token_ids or {}).items():
            if token_id is not None and token_id == self.mask_token_id:
                raise ValueError(
                    f"mask token id {self.mask_token_id} is the tokenizer's {name} token; the mask "
                    "token must be a token that never occurs in the data"
                )
