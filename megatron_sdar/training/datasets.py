"""SDAR training datasets: clean windows (Megatron's ``GPTDataset`` for CPT, packed SFT windows) noised
into ready samples.

Noise is drawn inside the dataset, from a generator seeded by ``(--seed, split, sample index)``.
Every pipeline stage and tensor-parallel rank that sees a sample therefore draws the same noise, and
a resumed run draws exactly what an uninterrupted run would have. Every rank builds the datasets and
reads its own copy of each micro-batch (no broadcast; the TP ranks check once that they agree). Under
``--sdar-block-size-schedule`` the block size of a sample likewise follows from its index: that of the
iteration consuming it for training, the final one for validation and test.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from megatron_sdar.batch import build_sdar_batch
from megatron_sdar.config import SDARConfig
from megatron_sdar.masks import document_ids_from_eod
from megatron_sdar.schedule import BLOCK_SIZE_FIELD, FixedBlockSize, SampleBlockSizes, schedule_from_args
from megatron_sdar.training.arguments import sdar_config_from_args

SPLIT_SEED_OFFSETS = {"train": 0, "valid": 1, "test": 2}


class SDARSampleDataset(torch.utils.data.Dataset):
    """Wraps a dataset of clean windows (``tokens``, ``doc_ids``, ``eligible``) and returns ready
    SDAR samples, noised with a generator seeded by ``(seed, split, index)``.

    ``block_size``, when given, maps a sample index to the block size to build it with (a
    block-size schedule, see :mod:`megatron_sdar.schedule`) in place of ``config.block_size``; each
    sample then also carries it as ``block_size``, which the training step reports.
    """

    def __init__(
        self,
        base: Any,
        config: SDARConfig,
        seed: int,
        split: str,
        block_size: Callable[[int], int] | None = None,
    ) -> None:
        self.base = base
        self.config = config
        self.seed = seed
        self.split_offset = SPLIT_SEED_OFFSETS[split]
        self.block_size = block_size
        self._configs: dict[int, SDARConfig] = {}

    def config_for(self, idx: int) -> SDARConfig:
        """The settings sample ``idx`` is built with."""
        if self.block_size is None:
            return self.config
        size = int(self.block_size(idx))
        if size not in self._configs:
            self._configs[size] = dataclasses.replace(self.config, block_size=size)
        return self._configs[size]

    def __len__(self) -> int:
        return len(self.base) * (2 if self.config.complementary_masks else 1)

    def noise_seed(self, idx: int) -> int:
        return (self.seed * 1_000_003 + self.split_offset * 998_244_353 + idx * 7_919 + 17) % (2**62)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        # With complementary masks, samples 2k and 2k + 1 (consecutive rows of one micro-batch: the
        # micro-batch size is even) are window k, noised by its generator and then complemented.
        window, second = divmod(idx, 2) if self.config.complementary_masks else (idx, 0)
        sample = self.base[window]
        gen = torch.Generator().manual_seed(self.noise_seed(window))
        config = self.config_for(idx)
        batch = build_sdar_batch(
            sample["tokens"][None], sample["doc_ids"][None], sample["eligible"][None], config, gen,
            complementary=bool(second),
        )  # fmt: skip
        out = batch.sample(0)
        if self.block_size is not None:
            out[BLOCK_SIZE_FIELD] = torch.tensor(config.block_size, dtype=torch.int32)
        return out


def clean_window(dataset: Any, idx: int) -> dict[str, torch.Tensor]:
    """A GPT dataset's window ``idx`` as ``tokens``, ``doc_ids``, ``eligible``.

    Documents are delimited by the end-of-document token; padding Megatron adds to a short final
    window is not eligible and forms a document of its own.
    """
    from megatron_sdar import compat

    text, pad_token_id = compat.gpt_dataset_window(dataset, idx)
    eod = dataset.config.tokenizer.eod
    tokens = torch.from_numpy(np.asarray(text, dtype=np.int64))
    pad = tokens == pad_token_id
    tokens = torch.where(pad, torch.full_like(tokens, eod), tokens)
    doc_ids = document_ids_from_eod(tokens[None], eod)[0].to(torch.int64)
    doc_ids = torch.where(pad, doc_ids.max() + 1, doc_ids)
    return {"tokens": tokens, "doc_ids": doc_ids, "eligible": ~pad}


def _sdar_gpt_dataset_classes() -> tuple[type, type]:
    """``GPTDataset``/``MockGPTDataset`` returning clean SDAR windows (built lazily: Megatron import)."""
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset

    class SDARGPTDataset(GPTDataset):
        """Megatron's GPT dataset (blends, splits, caching) yielding clean SDAR windows."""

        def __getitem__(self, idx):
            return clean_window(self, 0 if idx is None else idx)

    class SDARMockGPTDataset(MockGPTDataset):
        """Megatron's synthetic GPT dataset yielding clean SDAR windows."""

        def __getitem__(self, idx):
            return clean_window(self, 0 if idx is None else idx)

    return SDARGPTDataset, SDARMockGPTDataset


class EpochDataset(torch.utils.data.Dataset):
    """``num_samples`` samples drawn from ``base`` epoch by epoch, each epoch in a fresh seeded order.

    Sample ``i`` is a pure function of ``(seed, i)``, so Megatron's sampler resumes it exactly.
    """

    def __init__(self, base: Any, num_samples: int, seed: int) -> None:
        if len(base) == 0:
            raise ValueError("the dataset is empty")
        self.base = base
        self.num_samples = num_samples
        self.seed = seed
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> Any:
        epoch, pos = divmod(idx, len(self.base))
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = (epoch, rng.permutation(len(self.base)))
        return self.base[int(self._perm[1][pos])]


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """CPT: Megatron GPT datasets (blends and splits as usual); SFT: packed windows."""
    from megatron.training import get_args, get_tokenizer, print_rank_0

    args = get_args()
    sdar = sdar_config_from_args(args)
    schedule = schedule_from_args(args)
    tokenizer = get_tokenizer()
    if args.sdar_stage == "sft":
        from megatron_sdar.data.sft_windows import SFTWindowDataset

        if not args.data_path or len(args.data_path) != 1:
            raise ValueError(
                "--sdar-stage sft takes one --data-path prefix written by tools/preprocess_sft.py"
            )
        pad_id = args.sdar_sft_pad_token_id if args.sdar_sft_pad_token_id is not None else tokenizer.eod
        padded_to = None if schedule is None else schedule.largest  # examples fit every block size
        windows = SFTWindowDataset(args.data_path[0], args.seq_length, pad_id, padded_to)
        train = EpochDataset(windows, max(train_val_test_num_samples[0], 1), args.seed)
        datasets = [train, None, None]
        if args.valid_data_path:
            valid = SFTWindowDataset(args.valid_data_path[0], args.seq_length, pad_id, padded_to)
            datasets[1] = EpochDataset(valid, max(train_val_test_num_samples[1], 1), args.seed + 1)
    else:
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
        from megatron.training.utils import get_blend_and_blend_per_split

        blend, blend_per_split = get_blend_and_blend_per_split(args)
        gpt_config = GPTDatasetConfig(
            random_seed=args.seed,
            sequence_length=args.seq_length,
            blend=blend,
            blend_per_split=blend_per_split,
            split=args.split,
            path_to_cache=args.data_cache_path,
            tokenizer=tokenizer,
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=False,
            add_extra_token_to_sequence=False,
        )
        real, mock = _sdar_gpt_dataset_classes()
        print_rank_0("> building SDAR CPT datasets ...")
        # Every rank builds (the builder lets rank 0 write the index caches first) and reads its own
        # copy of each micro-batch: see training.step.SDARBatchReader.
        datasets = BlendedMegatronDatasetBuilder(
            mock if args.mock_data else real, train_val_test_num_samples, lambda: True, gpt_config
        ).build()
    sizes = dict.fromkeys(("train", "valid", "test"))
    if schedule is not None:
        # Training samples take the block size of the iteration that consumes them (Megatron's
        # sequential sampler starts at the consumed-sample count of the loaded checkpoint); validation
        # and test take the final one, which the model is decoded with.
        start, consumed = getattr(args, "iteration", 0), getattr(args, "consumed_train_samples", 0)
        sizes["train"] = SampleBlockSizes(schedule, args.global_batch_size, start, consumed)
        sizes["valid"] = sizes["test"] = FixedBlockSize(schedule.final)
        print_rank_0(
            f"> block-size schedule: {schedule.describe()}; training starts at iteration {start} with "
            f"block size {schedule.at(start)}; validation and test use block size {schedule.final}"
        )
    return tuple(
        None if ds is None else SDARSampleDataset(ds, sdar, args.seed, split, sizes[split])
        for ds, split in zip(datasets, ("train", "valid", "test"))
    )


# Megatron calls the provider, and builds data loaders, on every rank.
train_valid_test_datasets_provider.is_distributed = True
