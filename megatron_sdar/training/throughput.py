"""Data tokens per second as a logged metric, without synchronising host and device.

Megatron's ``--log-throughput`` reports TFLOP/s from a GPT formula that does not know SDAR processes
every window twice; what users compare across objectives and with the paper is clean (data) tokens
per second. The meter times consecutive training micro-batches on the host clock and hands Megatron
a ``[tokens, seconds / data-parallel size]`` pair, which Megatron sums over micro-batches and
data-parallel ranks and logs as their ratio: global data tokens per second. The host runs ahead of
the device between Megatron's own per-iteration synchronisations, so single intervals are skewed but
their sum over an iteration is the iteration's wall time. The first micro-batch after start or after
switching between training and evaluation has no interval and counts no tokens.
"""

from __future__ import annotations

import time

import torch

REPORT_KEY = "data tokens/s"


class ThroughputMeter:
    """Intervals between consecutive forward steps of the same mode (training or evaluation)."""

    def __init__(self, clock=time.perf_counter) -> None:
        self.clock = clock
        self._last: float | None = None
        self._training: bool | None = None

    def reset(self) -> None:
        self._last, self._training = None, None

    def measure(self, tokens: int, training: bool, data_parallel_size: int = 1) -> tuple[float, float]:
        """``(tokens, seconds / data_parallel_size)`` for the micro-batch starting now."""
        now = self.clock()
        if self._last is None or self._training != training:
            pair = (0.0, 1e-9)  # nothing to time yet: contributes no tokens and no time
        else:
            pair = (float(tokens), (now - self._last) / data_parallel_size)
        self._last, self._training = now, training
        return pair

    def report(
        self, tokens: int, training: bool, device: torch.device, data_parallel_size: int = 1
    ) -> torch.Tensor:
        """The pair as a tensor on ``device``, copied asynchronously (pinned) so the step never waits."""
        values = torch.tensor(self.measure(tokens, training, data_parallel_size), dtype=torch.float32)
        if device.type == "cuda":
            return values.pin_memory().to(device, non_blocking=True)
        return values.to(device)
