"""CUDA timing shared by the benchmarks (medians after warm-up, so compilation is never timed)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def cuda_time(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` runs, measured with CUDA events after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def wall_time(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median wall-clock milliseconds of ``fn()`` (host work included), synchronised."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)
