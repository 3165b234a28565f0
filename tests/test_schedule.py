"""The block-size schedule: parsing and its refusals, the block size by iteration and by sample index,
samples built at the block size of the iteration that consumes them, masks never shared across
block sizes, SFT windows padded for the largest block size, the resume check and the launch recipe."""

from __future__ import annotations

import dataclasses
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_sdar.batch import BATCH_FIELDS, build_sdar_batch
from megatron_sdar.config import SDARConfig
from megatron_sdar.masks import document_ids_from_lengths, make_layout
from megatron_sdar.schedule import (
    BLOCK_SIZE_FIELD,
    BlockSizeSchedule,
    FixedBlockSize,
    SampleBlockSizes,
    block_size_report,
    resume_mismatch,
    schedule_problems,
    warmup_schedule,
)
from megatron_sdar.training.datasets import SDARSampleDataset

ROOT = Path(__file__).resolve().parent.parent
LLADA = "1:0,4:2000,32:6000,8:9000"


def test_parse_reads_stages_and_writes_them_back():
    schedule = BlockSizeSchedule.parse(" 1:0, 4 :2000,32:6000 ,8:9000")
    assert str(schedule) == LLADA and BlockSizeSchedule.parse(str(schedule)) == schedule
    assert [tuple(s) for s in schedule.stages] == [(1, 0), (4, 2000), (32, 6000), (8, 9000)]
    assert schedule.final == 8 and schedule.largest == 32 and schedule.block_sizes == (1, 4, 8, 32)
    assert str(BlockSizeSchedule.parse("4:0")) == "4:0"


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("  ", "empty"),
        ("4", "'4' is not BLOCK:ITERATION"),
        ("1:0,4", "'4' is not BLOCK:ITERATION"),
        ("1:0,", "'' is not BLOCK:ITERATION"),
        ("1:0;4:10", "not BLOCK:ITERATION"),
        ("1:0:5", "not BLOCK:ITERATION"),
        ("a:0", "not BLOCK:ITERATION"),
        ("1.5:0", "not BLOCK:ITERATION"),
        ("0:0,4:10", "block sizes must be positive, got 0:0"),
        ("-2:0", "must be positive"),
        ("1:5,4:10", "must start at iteration 0"),
        ("1:-1,4:10", "must start at iteration 0"),
        ("1:0,4:10,8:10", "8:10 follows 4:10"),
        ("1:0,4:10,8:5", "must increase"),
    ],
)
def test_malformed_schedules_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        BlockSizeSchedule.parse(text)


def test_block_size_by_iteration_at_the_boundaries():
    schedule = BlockSizeSchedule.parse(LLADA)
    expected = {0: 1, 1999: 1, 2000: 4, 5999: 4, 6000: 32, 8999: 32, 9000: 8, 10**9: 8, -1: 1}
    assert {it: schedule.at(it) for it in expected} == expected


def test_sample_index_maps_to_the_iteration_consuming_it():
    schedule = BlockSizeSchedule.parse("1:0,2:1,4:3")
    fresh = SampleBlockSizes(schedule, global_batch_size=4)
    assert [fresh.iteration(i) for i in (0, 3, 4, 7, 8, 12)] == [0, 0, 1, 1, 2, 3]
    assert [fresh(i) for i in range(16)] == [1] * 4 + [2] * 8 + [4] * 4
    # resumed at iteration 3 after 12 samples: the same block sizes from there on
    resumed = SampleBlockSizes(schedule, 4, start_iteration=3, start_sample=12)
    assert all(resumed(i) == fresh(i) for i in range(12, 40))
    # a run that trained 3 iterations at global batch 2 and resumes at 4: iterations follow the run
    regrouped = SampleBlockSizes(schedule, 4, start_iteration=3, start_sample=6)
    assert [regrouped.iteration(i) for i in (6, 9, 10, 13)] == [3, 3, 4, 4]
    assert FixedBlockSize(8)(123) == 8


class Windows(torch.utils.data.Dataset):
    """Clean windows of 16 tokens: documents of 5, 3 and 8 tokens (the last two not eligible)."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        tokens = torch.randint(2, 60, (16,), generator=torch.Generator().manual_seed(idx))
        eligible = torch.ones(16, dtype=torch.bool)
        eligible[-2:] = False
        return {
            "tokens": tokens,
            "doc_ids": document_ids_from_lengths([5, 3, 8]).long(),
            "eligible": eligible,
        }


@pytest.mark.parametrize("counting", ["document", "window"])
def test_samples_of_iteration_k_have_the_block_size_of_k(counting):
    config = SDARConfig(block_size=4, mask_token_id=63, block_counting=counting)
    schedule = BlockSizeSchedule.parse("1:0,2:1,4:3")
    sizes = SampleBlockSizes(schedule, global_batch_size=2)
    data = SDARSampleDataset(Windows(), config, seed=7, split="train", block_size=sizes)
    doc_ids = document_ids_from_lengths([5, 3, 8])[None]
    for idx in range(10):
        block = schedule.at(idx // 2)
        sample = data[idx]
        assert int(sample[BLOCK_SIZE_FIELD]) == block
        assert torch.equal(sample["layout"], make_layout(doc_ids, block, counting)[0])
        # exactly the sample a run at that fixed block size builds (same noise)
        fixed = SDARSampleDataset(Windows(), dataclasses.replace(config, block_size=block), 7, "train")[idx]
        assert fixed.keys() == sample.keys() - {BLOCK_SIZE_FIELD}
        assert all(torch.equal(fixed[k], sample[k]) for k in fixed), idx
    if counting == "document":  # block ids restart with each document (B=4 at iteration 3)
        assert data[6]["layout"][1].tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    evaluation = SDARSampleDataset(Windows(), config, 7, "valid", FixedBlockSize(schedule.final))
    assert int(evaluation[0][BLOCK_SIZE_FIELD]) == 4
    plain = SDARSampleDataset(Windows(), config, 7, "train")
    assert BLOCK_SIZE_FIELD not in plain[0]


def test_block_size_report_is_a_sum_and_count_pair():
    pair = block_size_report(torch.tensor([4, 4, 2], dtype=torch.int32), torch.device("cpu"))
    assert pair.dtype == torch.float32 and pair.tolist() == [10.0, 3.0]


def test_the_batch_reader_passes_the_block_sizes_on(megatron_world):
    from megatron_sdar.training.step import SDARBatchReader

    config = SDARConfig(block_size=4, mask_token_id=63)
    data = SDARSampleDataset(
        Windows(), config, 7, "train", SampleBlockSizes(BlockSizeSchedule.parse("2:0"), 2)
    )
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    out = SDARBatchReader().read(iter(loader), torch.device("cpu"), 2, 16)
    assert out[BLOCK_SIZE_FIELD].tolist() == [2, 2]


@pytest.mark.parametrize("backend", ["sdpa", "split"])
def test_mixed_block_sizes_never_share_cached_masks(backend, megatron_world):
    """One model and one batch reader see the same tokens at B=4, then 1, then 4 again: each forward
    equals a fresh model's (same weights, empty caches) at that block size, and B=1 differs."""
    from megatron_sdar.training.step import SDARBatchReader
    from tests.helpers import tiny_model

    vocab, seq = 64, 16
    tokens = torch.randint(0, vocab - 1, (2, seq), generator=torch.Generator().manual_seed(3))
    doc_ids = torch.stack([document_ids_from_lengths([6, 10]), document_ids_from_lengths([16])])
    eligible = torch.ones_like(tokens, dtype=torch.bool)

    def config(block: int) -> SDARConfig:
        return SDARConfig(block_size=block, mask_token_id=vocab - 1, attention_backend=backend)

    def micro_batch(block: int) -> dict[str, torch.Tensor]:
        batch = build_sdar_batch(tokens, doc_ids, eligible, config(block), torch.Generator().manual_seed(0))
        return {f.name: getattr(batch, f.name) for f in BATCH_FIELDS}

    def forward(model, data) -> torch.Tensor:
        with torch.no_grad():
            return model(
                data["input_ids"], data["position_ids"], data["layout"], labels=data["labels"],
                layout_host=data.get("layout_host"),
            )  # fmt: skip

    blocks = [4, 1, 4]
    model, reader = tiny_model(config(4), vocab_size=vocab, seq_length=seq), SDARBatchReader()
    stream = iter([micro_batch(b) for b in blocks])
    seen = [forward(model, reader.read(stream, torch.device("cpu"), 2, seq)) for _ in blocks]
    for block, got in zip(blocks, seen):
        fresh = tiny_model(config(block), vocab_size=vocab, seq_length=seq)
        assert torch.equal(got, forward(fresh, micro_batch(block))), block
    assert not torch.equal(seen[0][..., 0], seen[1][..., 0])
    assert model.mask_cache.builds == 3  # the second B=4 is a new micro-batch: built again, not reused


def write_windows(prefix: Path, windows: list[list[int]]) -> None:
    """An SFT corpus whose windows hold examples of the given lengths (each fully eligible)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_sdar.data.sft_windows import encode_segments

    for kind in ("tokens", "segments"):
        builder = IndexedDatasetBuilder(f"{prefix}_{kind}.bin", dtype=np.int32)
        for lengths in windows:
            ordinals = np.repeat(np.arange(1, len(lengths) + 1), lengths)
            if kind == "tokens":
                values = np.arange(len(ordinals)) % 50 + 2
            else:
                values = encode_segments(ordinals.tolist(), [True] * len(ordinals))
            builder.add_document(np.asarray(values, dtype=np.int32), [len(ordinals)])
        builder.finalize(f"{prefix}_{kind}.idx")


def test_sft_windows_must_be_padded_for_the_largest_block_size(tmp_path):
    from megatron_sdar.data.sft_windows import SFTWindowDataset

    write_windows(tmp_path / "four", [[8, 8], [12], [4, 4, 8]])
    assert len(SFTWindowDataset(str(tmp_path / "four"), 16, 0, padded_to=4)) == 3
    with pytest.raises(ValueError, match=r"example of 12 tokens, not a multiple of 8.*--block-size 8"):
        SFTWindowDataset(str(tmp_path / "four"), 16, 0, padded_to=8)
    # windows past those checked on opening are checked when read
    write_windows(tmp_path / "late", [[8]] * SFTWindowDataset.CHECKED_ON_OPEN + [[8, 6]])
    late = SFTWindowDataset(str(tmp_path / "late"), 16, 0, padded_to=8)
    assert late[0]["tokens"].shape == (16,)
    with pytest.raises(ValueError, match=f"SFT window {SFTWindowDataset.CHECKED_ON_OPEN} .* of 6 tokens"):
        late[SFTWindowDataset.CHECKED_ON_OPEN]
    assert SFTWindowDataset(str(tmp_path / "late"), 16, 0)[SFTWindowDataset.CHECKED_ON_OPEN] is not None


def parse(extra: list[str], monkeypatch) -> types.SimpleNamespace:
    from tests.test_training import parse as parse_training_flags

    return parse_training_flags(extra, monkeypatch)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sdar-block-size-schedule", "1:0,4"], "'1:0,4': '4' is not BLOCK:ITERATION"),
        (
            ["--sdar-block-size-schedule", "1:0,3:10,4:20"],
            "block size(s) 3, which do not divide --seq-length 64",
        ),
        (["--sdar-block-size-schedule", "1:0,8:10"], "ends at block size 8 but --sdar-block-size is 4"),
        (["--sdar-block-size-schedule", "1:0,4:10", "--sdar-objective", "ar"], "--sdar-objective ar"),
        (
            "--sdar-block-size-schedule 1:0,4:5,6:10 --sdar-block-size 6 --seq-length 48 "
            "--sdar-stage sft".split(),
            "padded to a multiple of the largest block size (6)",
        ),
        (
            ["--sdar-block-size-schedule", "1:0,4:10", "--rampup-batch-size", "2", "2", "100"],
            "drop --rampup-batch-size",
        ),
        (
            ["--sdar-block-size-schedule", "1:0,4:10", "--dataloader-type", "cyclic"],
            "--dataloader-type single",
        ),
        (
            ["--sdar-block-size-schedule", "1:0,4:10", "--phase-transition-iterations", "5"],
            "--phase-transition-iterations",
        ),
        (
            ["--sdar-block-size-schedule", "1:0,4:10", "--train-iters", "10"],
            "is never reached with --train-iters 10 (the last step follows 9 iterations)",
        ),
    ],
)
def test_flag_refusals_say_what_to_change(extra, message, monkeypatch):
    from megatron_sdar.training.arguments import SettingsError, validate_sdar_args

    args = parse(extra, monkeypatch)
    with pytest.raises(SettingsError) as err:
        validate_sdar_args(args, vocab_size=128)
    assert message in str(err.value)


def test_valid_schedules_pass(monkeypatch):
    from megatron_sdar.training.arguments import validate_sdar_args

    args = parse(["--sdar-block-size-schedule", LLADA, "--sdar-block-size", "8", "--train-iters", "9001"],
                 monkeypatch)  # fmt: skip
    validate_sdar_args(args, vocab_size=128)
    assert schedule_problems(parse([], monkeypatch)) == []  # no schedule, nothing to check
    sft = ["--sdar-stage", "sft", "--sdar-block-size-schedule", "1:0,2:5,8:10,4:20"]
    assert schedule_problems(parse(sft, monkeypatch)) == []


def test_a_resume_must_continue_the_recorded_schedule():
    def run(schedule):
        return types.SimpleNamespace(sdar_block_size_schedule=schedule)

    assert resume_mismatch(run("1:0,4:10"), run(" 1:0, 4:10")) is None
    assert resume_mismatch(run(None), run(None)) is None
    assert resume_mismatch(types.SimpleNamespace(), run(None)) is None  # saved before the flag existed
    changed = resume_mismatch(run("1:0,4:10"), run("1:0,4:20"))
    assert "trained with --sdar-block-size-schedule '1:0,4:10' but this run gives" in changed
    assert "--finetune" in changed
    assert "this run gives no --sdar-block-size-schedule" in resume_mismatch(run("1:0,4:10"), run(None))
    assert "trained with no --sdar-block-size-schedule" in resume_mismatch(run(None), run("1:0,4:10"))


def test_warmup_schedule_doubles_up_to_the_block_size():
    assert str(warmup_schedule(4, 10000)) == "1:0,2:500,4:1500"
    assert str(warmup_schedule(8, 10000)) == "1:0,2:214,4:643,8:1500"
    assert warmup_schedule(12, 1000).block_sizes == (1, 2, 4, 12)
    assert warmup_schedule(6, 1000).block_sizes == (1, 2, 6)  # each size divides the next
    assert str(warmup_schedule(1, 10)) == "1:0"
    assert str(warmup_schedule(4, 4)) == "1:0,2:1,4:2"  # stages at least one iteration long
    with pytest.raises(ValueError, match="too few"):
        warmup_schedule(16, 3)


def test_launch_recipe_passes_the_schedule(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    import launch

    save = tmp_path / "run"
    save.mkdir()
    (save / "latest_checkpointed_iteration.txt").write_text("500")

    def flags_for(*more: str) -> list[str]:
        argv = ["--model", "qwen3-1.7b", "--stage", "cpt", "--data-path", "/data/x", "--save", str(save),
                "--tokenizer", "/tok", *more]  # fmt: skip
        return launch.pretrain_args(launch.parse_args(argv))

    def flag(flags: list[str], name: str) -> str | None:
        return flags[flags.index(name) + 1] if name in flags else None

    assert flag(flags_for(), "--sdar-block-size-schedule") is None
    wsd = flags_for("--block-size-schedule", "wsd")
    assert (
        flag(wsd, "--sdar-block-size-schedule") == "1:0,2:500,4:1500"
        and flag(wsd, "--sdar-block-size") == "4"
    )
    assert flag(flags_for("--block-size-schedule", "wsd", "--train-iters", "2000"),
                "--sdar-block-size-schedule") == "1:0,2:100,4:300"  # fmt: skip
    llada = flags_for("--block-size-schedule", LLADA)
    assert flag(llada, "--sdar-block-size-schedule") == LLADA and flag(llada, "--sdar-block-size") == "8"
    with pytest.raises(SystemExit, match="ends at block size 8 but --block-size is 4"):
        flags_for("--block-size-schedule", LLADA, "--block-size", "4")
    with pytest.raises(SystemExit, match="is not BLOCK:ITERATION"):
        flags_for("--block-size-schedule", "fast")
    with pytest.raises(SystemExit, match="block size\\(s\\) 3"):
        flags_for("--block-size-schedule", "1:0,3:10,4:20")
    # what the recipe passes is a schedule pretrain_sdar.py accepts
    monkeypatch.setattr(sys, "argv", ["pretrain_sdar.py", *llada])
    from megatron.training.arguments import parse_args

    import pretrain_sdar

    assert schedule_problems(parse_args(pretrain_sdar._extra_args)) == []
