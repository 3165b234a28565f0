"""SDAR settings that sit beside Megatron's ``TransformerConfig``, with up-front validation."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from megatron_sdar.masks import BlockCounting, CleanAttention
from megatron_sdar.noise import EmptyRows, NoiseUnit, check_t_range

ATTENTION_BACKENDS = ("auto", "flex", "split", "sdpa")


class LossNormalizer(enum.StrEnum):
    """What the summed, 1/p-weighted masked cross-entropy is divided by (globally)."""

    ELIGIBLE = "eligible"  # tokens that could be masked (released SDAR code)
    MASKED = "masked"  # tokens that were masked (older choice)


class DocumentMask(enum.StrEnum):
    """Whether the attention mask separates the documents packed into a window."""

    SEPARATE = "separate"  # never across documents; blocks counted per document (SFT, default)
    # The paper's CPT: "a global block-wise attention mask" over the whole window, attention across
    # documents, blocks counted from the window start (the noise is still drawn per document).
    GLOBAL = "global"


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
    noise_range: tuple[float, float] = (0.0, 1.0)  # t ~ U(t_min, t_max)
    empty_rows: EmptyRows = EmptyRows.REDRAW  # rows that draw no masked token
    document_mask: DocumentMask = DocumentMask.SEPARATE
    # each window twice in a micro-batch (consecutive rows), the second with the complementary mask
    complementary_masks: bool = False
    loss_normalizer: LossNormalizer = LossNormalizer.ELIGIBLE
    clean_attention: CleanAttention = CleanAttention.BLOCK_CAUSAL
    block_counting: BlockCounting = BlockCounting.DOCUMENT
    position_ids: PositionIds = PositionIds.CONTINUOUS
    attention_backend: str = "auto"
    flex_kernel_options: dict | None = None  # FlexAttention kernel_options (tile sizes, warps, ...)
    ar_loss_weight: float = 0.0  # W of the joint loss: diffusion + W * next-token CE on the clean half
    # the largest block a batch may hold (a block-size schedule's largest; None: block_size); context
    # parallelism exchanges the noised keys within this distance of a rank's chunks
    largest_block_size: int | None = None

    @property
    def block_size_bound(self) -> int:
        """The largest block a micro-batch may hold."""
        return self.largest_block_size or self.block_size

    def __post_init__(self) -> None:
        self.noise_unit = NoiseUnit(self.noise_unit)
        self.noise_range = (float(self.noise_range[0]), float(self.noise_range[1]))
        self.empty_rows = EmptyRows(self.empty_rows)
        self.document_mask = DocumentMask(self.document_mask)
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
        """Raise ``ValueError`` listing what to change when the settings cannot work together."""
        problems = self.problems(seq_length, vocab_size, special_token_ids)
        if problems:
            raise ValueError("; ".join(problems))

    def problems(
        self,
        seq_length: int,
        vocab_size: int | None = None,
        special_token_ids: dict[str, int] | None = None,
    ) -> list[str]:
        """Every setting that cannot work, each saying what to change (empty when all is well).

        Token checks run only when ``vocab_size`` is known (after the tokenizer is built).
        """
        found = []
        if self.block_size < 1:
            found.append(f"--sdar-block-size must be >= 1, got {self.block_size}")
        elif seq_length % self.block_size != 0:
            found.append(
                f"sequence length {seq_length} is not a multiple of the SDAR block size "
                f"{self.block_size}; pick --seq-length as a multiple of --sdar-block-size "
                f"(e.g. {seq_length - seq_length % self.block_size or self.block_size})"
            )
        if not 0.0 <= self.noise_eps < 1.0:
            found.append(f"--sdar-noise-eps must be in [0, 1), got {self.noise_eps}")
        try:
            check_t_range(self.noise_range)
        except ValueError as err:
            found.append(f"--sdar-noise-range: {err}")
        if self.flex_kernel_options is not None and not isinstance(self.flex_kernel_options, dict):
            found.append(
                f"--sdar-flex-kernel-options must be a JSON object, got {self.flex_kernel_options!r}"
            )
        if self.ar_loss_weight < 0:
            found.append(f"--sdar-ar-loss-weight must be >= 0 (0 = off), got {self.ar_loss_weight}")
        elif self.ar_loss_weight > 0:
            if self.clean_attention is not CleanAttention.CAUSAL:
                found.append(
                    "--sdar-ar-loss-weight trains next-token prediction on the clean half, which must "
                    "then be token-causal: under block-causal attention a clean token sees the next "
                    "token of its block, its own target. Pass --sdar-clean-attention causal (and decode "
                    "by blocks with tools/generate.py --clean-attention causal)"
                )
            if self.document_mask is DocumentMask.GLOBAL:
                found.append(
                    "--sdar-ar-loss-weight keeps next-token targets inside documents, but "
                    "--sdar-document-mask global keeps no document boundaries: use separate"
                )
        if self.attention_backend not in ATTENTION_BACKENDS:
            found.append(
                f"unknown SDAR attention backend {self.attention_backend!r}; use one of {ATTENTION_BACKENDS}"
            )
        if vocab_size is None:
            return found
        if not 0 <= self.mask_token_id < vocab_size:
            found.append(
                f"mask token id {self.mask_token_id} is outside the vocabulary [0, {vocab_size}); "
                "set --sdar-mask-token-id to an unused token (Qwen3: 151669 '<|MASK|>')"
            )
        for name, token_id in (special_token_ids or {}).items():
            if token_id is not None and token_id == self.mask_token_id:
                found.append(
                    f"mask token id {self.mask_token_id} is the tokenizer's {name} token; the mask "
                    "token must be a token that never occurs in the data"
                )
        return found
