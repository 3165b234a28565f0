"""SDAR datasets: packed SFT windows stored as Megatron indexed datasets.

An SFT corpus is two parallel ``IndexedDataset`` files written by ``tools/preprocess_sft.py``:
``{prefix}_tokens`` holds each packed window's tokens and ``{prefix}_segments`` a code per token,
``2 * example_ordinal + eligible`` (ordinals start at 1 inside each window). Windows are stored
unpadded and padded to the sequence length on read; padding is a document of its own that is never
eligible. Sample ``i`` is always the same window, so Megatron's samplers shard it across
data-parallel ranks and resume it exactly from ``consumed_samples``.
"""

from __future__ import annotations

import numpy as np
import torch

PAD_SEGMENT = 0


def encode_segments(ordinals: list[int], eligible: list[bool]) -> np.ndarray:
    """Per-token segment codes for one window."""
    return np.asarray(ordinals, dtype=np.int64) * 2 + np.asarray(eligible, dtype=np.int64)


def decode_segments(codes: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(document ids, eligible)`` from segment codes; code 0 (padding) stays its own document."""
    codes = torch.as_tensor(np.asarray(codes, dtype=np.int64))
    return codes // 2, (codes % 2).to(torch.bool)


class SFTWindowDataset(torch.utils.data.Dataset):
    """Packed SFT windows of exactly ``seq_length`` tokens: ``tokens``, ``doc_ids``, ``eligible``.

    ``padded_to``: the block size the examples must have been padded to a multiple of (the largest
    of a block-size schedule); the first windows are checked when the dataset opens and every window
    when it is read, so data preprocessed with a smaller ``--block-size`` is refused.
    """

    CHECKED_ON_OPEN = 16  # windows whose padding is checked when the dataset opens

    def __init__(self, prefix: str, seq_length: int, pad_id: int, padded_to: int | None = None) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.tokens = IndexedDataset(f"{prefix}_tokens")
        self.segments = IndexedDataset(f"{prefix}_segments")
        if len(self.tokens) != len(self.segments):
            raise ValueError(
                f"{prefix}_tokens has {len(self.tokens)} windows but {prefix}_segments has "
                f"{len(self.segments)}: the SFT dataset is corrupt; rerun tools/preprocess_sft.py"
            )
        longest = int(self.tokens.sequence_lengths.max()) if len(self.tokens) else 0
        if longest > seq_length:
            raise ValueError(
                f"{prefix} was packed into windows of up to {longest} tokens but --seq-length is "
                f"{seq_length}; repack with --seq-length {seq_length} or raise --seq-length"
            )
        self.seq_length = seq_length
        self.pad_id = pad_id
        self.prefix = prefix
        self.padded_to = padded_to
        for idx in range(min(len(self), self.CHECKED_ON_OPEN) if padded_to else 0):
            self._check_padding(idx, np.asarray(self.segments[idx], dtype=np.int64))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        tokens = np.asarray(self.tokens[idx], dtype=np.int64)
        codes = np.asarray(self.segments[idx], dtype=np.int64)
        if tokens.shape != codes.shape:
            raise ValueError(
                f"SFT window {idx}: tokens and segments differ in length; the dataset is corrupt"
            )
        if self.padded_to:
            self._check_padding(idx, codes)
        pad = self.seq_length - len(tokens)
        tokens = np.concatenate([tokens, np.full(pad, self.pad_id, dtype=np.int64)])
        codes = np.concatenate([codes, np.full(pad, PAD_SEGMENT, dtype=np.int64)])
        doc_ids, eligible = decode_segments(codes)
        return {"tokens": torch.from_numpy(tokens), "doc_ids": doc_ids, "eligible": eligible}

    def _check_padding(self, idx: int, codes: np.ndarray) -> None:
        """Every example of window ``idx`` spans a multiple of ``padded_to`` tokens."""
        ordinals = codes // 2
        starts = np.flatnonzero(np.diff(ordinals, prepend=-1))
        lengths = np.diff(np.append(starts, len(ordinals)))
        short = [int(n) for n, o in zip(lengths, ordinals[starts]) if o != PAD_SEGMENT and n % self.padded_to]
        if short:
            raise ValueError(
                f"SFT window {idx} of {self.prefix} holds an example of {short[0]} tokens, not a multiple "
                f"of {self.padded_to}, the largest block size of --sdar-block-size-schedule: preprocess the "
                f"data with tools/preprocess_sft.py --block-size {self.padded_to}"
            )
