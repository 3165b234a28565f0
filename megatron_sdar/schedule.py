"""A block-size schedule: the SDAR block size as a piecewise-constant function of the training iteration.

Written ``"B:ITER,B:ITER,..."``, e.g. ``"1:0,4:2000,32:6000,8:9000"``: block size 1 from iteration 0,
4 from iteration 2000, 32 from 6000 and 8 from 9000 on (LLaDA2.0's warmup-stable-decay over the block
size: start near AR, grow, optionally end on a smaller block). ``ITER`` counts completed iterations,
as Megatron's checkpoints and ``--lr-warmup-iters`` do: the step taken after N completed iterations
(which Megatron logs as iteration N + 1, and which a run resumed from the checkpoint of iteration N
takes first) uses ``schedule.at(N)``.

Samples are noised and laid out in the dataset, ahead of time, keyed by their index, so the block size
of a training sample must follow from its index alone. Megatron's sequential sampler hands out indices
in order, one global batch per iteration, so sample ``i`` is consumed by iteration
``start_iteration + (i - start_sample) // global_batch_size`` (:class:`SampleBlockSizes`, anchored at
the iteration and consumed-sample count the run starts from, which is ``i // global_batch_size``
unless the global batch size changed across a resume). Validation and test samples use the final block
size (:class:`FixedBlockSize`), the one the model is decoded and exported with, so their figures stay
comparable over the whole run.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

BLOCK_SIZE_FIELD = "block_size"  # the sample key carrying the block size it was built with
BLOCK_SIZE_KEY = "block size"  # the metric the training step reports
EXAMPLE = "1:0,4:2000,32:6000,8:9000"


class Stage(NamedTuple):
    """Block size ``block_size`` from ``start`` completed iterations on."""

    block_size: int
    start: int


@dataclass(frozen=True)
class BlockSizeSchedule:
    """Stages in order of their start; the first starts at iteration 0. Built valid or not at all."""

    stages: tuple[Stage, ...]

    def __post_init__(self) -> None:
        stages = tuple(Stage(*s) for s in self.stages)
        object.__setattr__(self, "stages", stages)
        if not stages:
            raise ValueError(f"the schedule has no stage; write BLOCK:ITERATION pairs, e.g. '{EXAMPLE}'")
        bad = [f"{b}:{s}" for b, s in stages if b < 1]
        if bad:
            raise ValueError(f"block sizes must be positive, got {', '.join(bad)}")
        if stages[0].start != 0:
            raise ValueError(
                f"the first stage must start at iteration 0, got {stages[0].block_size}:{stages[0].start} "
                f"(start with e.g. '1:0')"
            )
        for before, after in zip(stages, stages[1:]):
            if after.start <= before.start:
                raise ValueError(
                    f"iterations must increase from stage to stage: "
                    f"{after.block_size}:{after.start} follows {before.block_size}:{before.start}"
                )

    @classmethod
    def parse(cls, text: str) -> BlockSizeSchedule:
        """The schedule ``text`` describes (``ValueError`` saying what is wrong otherwise)."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"the schedule is empty; write BLOCK:ITERATION pairs, e.g. '{EXAMPLE}'")
        stages = []
        for part in text.split(","):
            fields = part.split(":")
            if len(fields) != 2 or not all(_is_whole_number(f) for f in fields):
                raise ValueError(
                    f"{part.strip()!r} is not BLOCK:ITERATION (two whole numbers); write e.g. '{EXAMPLE}'"
                )
            stages.append(Stage(int(fields[0]), int(fields[1])))
        return cls(tuple(stages))

    def __str__(self) -> str:
        return ",".join(f"{b}:{s}" for b, s in self.stages)

    def at(self, iteration: int) -> int:
        """The block size of the step taken after ``iteration`` completed iterations."""
        starts = [s.start for s in self.stages]
        return self.stages[max(bisect.bisect_right(starts, iteration) - 1, 0)].block_size

    @property
    def final(self) -> int:
        """The last stage's block size (the one decoding and the exported checkpoint use)."""
        return self.stages[-1].block_size

    @property
    def block_sizes(self) -> tuple[int, ...]:
        """Every block size the schedule uses, once each, smallest first."""
        return tuple(sorted({s.block_size for s in self.stages}))

    @property
    def largest(self) -> int:
        return max(self.block_sizes)

    def problems(self, seq_length: int) -> list[str]:
        """Block sizes that do not divide the window length ``seq_length``."""
        bad = [b for b in self.block_sizes if seq_length % b]
        if not bad:
            return []
        return [f"--sdar-block-size-schedule uses block size(s) {', '.join(map(str, bad))}, which do not "
                f"divide --seq-length {seq_length}: every block size must divide it"]  # fmt: skip

    def describe(self) -> str:
        """One line for the log: each stage's block size and first iteration."""
        return ", ".join(f"B={b} from iteration {s}" for b, s in self.stages)


def _is_whole_number(text: str) -> bool:
    text = text.strip()
    return text.isdigit() or (text[:1] in "+-" and text[1:].isdigit())


@dataclass(frozen=True)
class SampleBlockSizes:
    """The block size of each training sample index: that of the iteration consuming it.

    ``start_iteration`` and ``start_sample`` are where the run's sampler starts (Megatron's
    ``args.iteration`` and ``args.consumed_train_samples`` after loading a checkpoint; 0 and 0 for a
    fresh run). Picklable, for data-loader workers.
    """

    schedule: BlockSizeSchedule
    global_batch_size: int
    start_iteration: int = 0
    start_sample: int = 0

    def __post_init__(self) -> None:
        if self.global_batch_size < 1:
            raise ValueError(f"global batch size must be positive, got {self.global_batch_size}")

    def iteration(self, index: int) -> int:
        """The iteration (completed iterations before it) that consumes sample ``index``."""
        return max(self.start_iteration + (index - self.start_sample) // self.global_batch_size, 0)

    def __call__(self, index: int) -> int:
        return self.schedule.at(self.iteration(index))


@dataclass(frozen=True)
class FixedBlockSize:
    """The same block size for every sample index (validation and test under a schedule)."""

    block_size: int

    def __call__(self, index: int) -> int:
        return self.block_size


def block_size_report(block_sizes: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``[sum of block sizes, samples]`` on ``device`` (Megatron logs the ratio: the mean block size of
    the samples an iteration, or a logging interval, trained on), copied without waiting."""
    sizes = block_sizes.reshape(-1).to("cpu", torch.float32)
    values = torch.stack([sizes.sum(), torch.tensor(float(sizes.numel()))])
    if device.type == "cuda":
        return values.pin_memory().to(device, non_blocking=True)
    return values.to(device)


def warmup_schedule(block_size: int, iterations: int, warmup_fraction: float = 0.15) -> BlockSizeSchedule:
    """A warmup-stable schedule ending at ``block_size``: from 1 (AR) through the powers of two that
    divide ``block_size`` up to ``block_size`` itself, each stage twice as long as the one before, the
    last reached after ``warmup_fraction`` of ``iterations``. ``warmup_schedule(4, 10000)`` is
    ``1:0,2:500,4:1500``. Every size divides the next, so SFT windows padded to ``block_size`` suit
    all of them."""
    if block_size < 1 or iterations < 1 or not 0.0 < warmup_fraction <= 1.0:
        raise ValueError(
            f"need block_size >= 1, iterations >= 1 and 0 < warmup_fraction <= 1, got {block_size}, "
            f"{iterations}, {warmup_fraction}"
        )
    sizes = [1]
    while sizes[-1] * 2 < block_size and block_size % (sizes[-1] * 2) == 0:
        sizes.append(sizes[-1] * 2)
    if block_size > 1:
        sizes.append(block_size)
    steps = len(sizes) - 1
    stages, previous = [Stage(1, 0)], 0
    for j in range(1, steps + 1):
        start = max(round(iterations * warmup_fraction * (2**j - 1) / (2**steps - 1)), previous + 1)
        if start >= iterations:
            raise ValueError(
                f"{iterations} iterations are too few to warm the block size up to {block_size} "
                f"through {sizes}"
            )
        stages.append(Stage(sizes[j], start))
        previous = start
    return BlockSizeSchedule(tuple(stages))


# --- the training run's flags -------------------------------------------------------------------------


def schedule_from_args(args: Any) -> BlockSizeSchedule | None:
    """The ``--sdar-block-size-schedule`` of ``args`` (``None`` without one; ``ValueError`` if malformed)."""
    text = getattr(args, "sdar_block_size_schedule", None)
    return None if text is None else BlockSizeSchedule.parse(text)


def schedule_problems(args: Any) -> list[str]:
    """Every reason the run's ``--sdar-block-size-schedule`` cannot work, each saying what to change."""
    text = getattr(args, "sdar_block_size_schedule", None)
    if text is None:
        return []
    flag = "--sdar-block-size-schedule"
    try:
        schedule = BlockSizeSchedule.parse(text)
    except ValueError as err:
        return [f"{flag} {text!r}: {err}"]
    problems = schedule.problems(args.seq_length)
    if schedule.final != args.sdar_block_size:
        problems.append(
            f"{flag} ends at block size {schedule.final} but --sdar-block-size is {args.sdar_block_size}: "
            "--sdar-block-size is the block size the model is decoded with (recorded in checkpoints and "
            "exports; validation and test use it), so the schedule must end on it; pass "
            f"--sdar-block-size {schedule.final} or end the schedule on {args.sdar_block_size}"
        )
    if getattr(args, "sdar_objective", "sdar") != "sdar":
        problems.append(f"{flag} schedules the block-diffusion objective; drop it with --sdar-objective ar")
    if getattr(args, "sdar_stage", "cpt") == "sft":
        odd = [b for b in schedule.block_sizes if schedule.largest % b]
        if odd:
            problems.append(
                f"{flag}: SFT examples are padded to a multiple of the largest block size "
                f"({schedule.largest}) when preprocessed, which block size(s) {', '.join(map(str, odd))} "
                "do not divide: use block sizes that divide the largest one"
            )
    sampler = "sample indices to the iterations that consume them"
    if getattr(args, "rampup_batch_size", None):
        problems.append(f"{flag} maps {sampler} with a fixed global batch size: drop --rampup-batch-size")
    if getattr(args, "decrease_batch_size_if_needed", False):
        problems.append(f"{flag} maps {sampler} with a fixed global batch size: drop "
                        "--decrease-batch-size-if-needed")  # fmt: skip
    if (getattr(args, "dataloader_type", None) or "single") != "single":
        problems.append(f"{flag} maps {sampler}, which needs Megatron's sequential sampler: use "
                        f"--dataloader-type single (got {args.dataloader_type})")  # fmt: skip
    if getattr(args, "phase_transition_iterations", None):
        problems.append(f"{flag} maps {sampler}; --phase-transition-iterations restarts the data order: "
                        "drop one of them")  # fmt: skip
    train_iters = getattr(args, "train_iters", None)
    if train_iters is not None and schedule.stages[-1].start >= train_iters:
        last = schedule.stages[-1]
        problems.append(f"{flag}: the last stage {last.block_size}:{last.start} is never reached with "
                        f"--train-iters {train_iters} (the last step follows {train_iters - 1} iterations), "
                        "so the model would never train at the block size it is decoded with: start it "
                        "earlier or train longer")  # fmt: skip
    return problems


def _schedule_words(text: str | None) -> str:
    return f"--sdar-block-size-schedule '{text}'" if text is not None else "no --sdar-block-size-schedule"


def resume_mismatch(recorded: Any, current: Any) -> str | None:
    """Why a run with ``current`` arguments cannot resume a checkpoint that stored ``recorded``
    (``None`` when the schedules agree); either may be ``None`` (no schedule)."""
    saved = getattr(recorded, "sdar_block_size_schedule", None)
    wanted = getattr(current, "sdar_block_size_schedule", None)
    same = (saved is None and wanted is None) or (
        saved is not None and wanted is not None and _canonical(saved) == _canonical(wanted)
    )
    if same:
        return None
    return (f"the checkpoint was trained with {_schedule_words(saved)} but this run gives "
            f"{_schedule_words(wanted)}: a resumed run continues the schedule it was trained with, so "
            "pass the recorded one (or start a new stage from the checkpoint with --finetune)")  # fmt: skip


def _canonical(text: str) -> str:
    try:
        return str(BlockSizeSchedule.parse(text))
    except ValueError:
        return text


def resume_problems(args: Any) -> list[str]:
    """A resume (``--load`` holding a checkpoint, no ``--finetune``) whose block-size schedule differs
    from the one the checkpoint recorded. Reads the arguments a ``torch_dist`` checkpoint stores;
    checkpoints of other formats, or that cannot be read here, are left to Megatron."""
    from megatron_sdar.training.resume import checkpoint_args

    found = checkpoint_args(args)
    if found is None:
        return []
    path, recorded = found
    why = resume_mismatch(recorded, args)
    return [] if why is None else [f"--load {args.load} ({os.path.basename(path)}): {why}"]
