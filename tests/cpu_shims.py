"""Test-only shims that let Megatron's CUDA-assuming schedule code run over gloo on CPU.

Megatron-Core's pipeline schedules create bookkeeping tensors with ``device="cuda"`` and its p2p
layer asks ``torch.cuda.current_device()``. On CPU test machines these modules get a ``torch``
stand-in that maps those requests to the CPU. Library code never uses this.
"""

from __future__ import annotations

import types

import torch


class _CpuCuda:
    """``torch.cuda`` as seen by the shimmed modules: current device is the CPU, sync is a no-op."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return "cpu"

    @staticmethod
    def synchronize(*args, **kwargs):
        return None


class _CpuTorch(types.ModuleType):
    """``torch`` with ``device="cuda"`` factory calls redirected to the CPU."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CpuCuda()

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _cpu(kwargs):
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return kwargs

    def zeros(self, *args, **kwargs):
        return torch.zeros(*args, **self._cpu(kwargs))

    def empty(self, *args, **kwargs):
        return torch.empty(*args, **self._cpu(kwargs))

    def tensor(self, *args, **kwargs):
        return torch.tensor(*args, **self._cpu(kwargs))


def install_cpu_schedule_shims() -> None:
    """Point Megatron's schedule and p2p modules at the CPU ``torch`` stand-in."""
    from megatron.core.pipeline_parallel import p2p_communication, schedules

    cpu_torch = _CpuTorch()
    schedules.torch = cpu_torch
    p2p_communication.torch = cpu_torch
