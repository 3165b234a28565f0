"""The data-tokens-per-second meter: intervals between forward steps of one mode, per DP share."""

from __future__ import annotations

import torch

from megatron_sdar.training.throughput import ThroughputMeter


def test_meter_times_consecutive_steps_and_restarts_on_mode_switch():
    ticks = iter([0.0, 2.0, 3.0, 10.0, 10.5, 11.0])
    meter = ThroughputMeter(clock=lambda: next(ticks))
    assert meter.measure(100, training=True)[0] == 0.0  # first step: nothing to time
    assert meter.measure(100, training=True) == (100.0, 2.0)
    assert meter.measure(100, training=True, data_parallel_size=4) == (100.0, 0.25)
    assert meter.measure(50, training=False)[0] == 0.0  # evaluation starts: its own clock
    assert meter.measure(50, training=False) == (50.0, 0.5)
    assert meter.measure(100, training=True)[0] == 0.0  # back to training: the eval gap is not counted


def test_report_is_a_megatron_sum_count_pair():
    """Megatron sums [tokens, seconds] over micro-batches and DP ranks and logs the ratio."""
    ticks = iter([0.0, 1.0, 3.0])
    meter = ThroughputMeter(clock=lambda: next(ticks))
    pairs = [meter.report(64, True, torch.device("cpu"), data_parallel_size=2) for _ in range(3)]
    assert all(p.shape == (2,) and p.dtype == torch.float32 for p in pairs)
    # two DP ranks with the same timings: sum of both ranks' pairs
    total = 2 * torch.stack(pairs).sum(0)
    assert abs(total[0] / total[1] - (2 * 128) / 3.0) < 1e-3
