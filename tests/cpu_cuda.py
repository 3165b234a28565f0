"""Test-only CUDA emulation on the CPU, so Megatron's whole training loop runs in CI.

``megatron.training`` assumes CUDA throughout (``.cuda()``, ``device="cuda"`` factories, timers that
synchronise, memory reports, the CUDA RNG tracker). In a test subprocess, :func:`install` maps all
of that onto the CPU: a ``TorchFunctionMode`` rewrites CUDA devices in tensor factories and moves to
the CPU, and the ``torch.cuda`` functions the loop calls get CPU meanings. Nothing here is used by
the library or the tools; it exists so ``pretrain_sdar.py`` (training, checkpoint save and load,
resume) is exercised end to end without a GPU.

    python tests/cpu_cuda.py pretrain_sdar.py <flags> --distributed-backend gloo
"""

from __future__ import annotations

import os
import runpy
import sys
import time

import torch
from torch.overrides import TorchFunctionMode


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class _CpuDevices(TorchFunctionMode):
    """Rewrite CUDA device arguments to the CPU for every torch call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.cuda, torch.Tensor.pin_memory):
            return args[0]
        if func is torch.Tensor.record_stream:
            return None
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return func(*args).replace("torch.", "torch.cuda.", 1)  # type checks expect CUDA tensors
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        kwargs.pop("non_blocking", None) if func is torch.Tensor.to else None
        return func(*args, **kwargs)


class _Event:
    """``torch.cuda.Event`` on the host clock."""

    def __init__(self, *args, **kwargs) -> None:
        self.t = None

    def record(self, *args, **kwargs) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        return None

    def wait(self, *args, **kwargs) -> None:
        return None

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: _Event) -> float:
        return (end.t - self.t) * 1000.0


class _Stream:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, *args, **kwargs) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def record_event(self, event=None):
        return event or _Event()

    def wait_event(self, *args, **kwargs) -> None:
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


def _cpu_factory(factory):
    def make(*args, **kwargs):
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return make


_MODE: _CpuDevices | None = None


def install() -> None:
    """Map CUDA onto the CPU for the rest of this process (test subprocesses only)."""
    global _MODE
    if _MODE is not None:
        return
    import torch._dynamo

    torch._dynamo.config.disable = True  # compiled fusions run eagerly: the compiler would probe CUDA
    _MODE = _CpuDevices()
    _MODE.__enter__()
    cuda = torch.cuda

    def const(value):
        return lambda *a, **k: value  # a new function each time: dynamo maps torch objects one to one

    def zero():
        return const(0)

    def none():
        return const(None)

    cuda.is_available = const(True)
    cuda.device_count = const(1)
    cuda.current_device = const(0)
    cuda.set_device = none()
    cuda.synchronize = none()
    cuda.empty_cache = none()
    cuda.reset_peak_memory_stats = none()
    cuda.reset_max_memory_allocated = none()
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        setattr(cuda, name, zero())
    cuda.memory_stats = lambda *a, **k: {}
    cuda.mem_get_info = lambda *a, **k: (64 << 30, 64 << 30)
    cuda.get_device_capability = lambda *a, **k: (9, 0)
    cuda.get_device_name = lambda *a, **k: "cpu (emulated cuda)"
    cuda.get_device_properties = lambda *a, **k: type(
        "Props",
        (),
        {"total_memory": 64 << 30, "name": "cpu", "major": 9, "minor": 0, "multi_processor_count": 1},
    )()
    cuda.Event = _Event
    cuda.Stream = _Stream
    cuda.current_stream = lambda *a, **k: _Stream()
    cuda.default_stream = lambda *a, **k: _Stream()
    cuda.stream = lambda *a, **k: _Stream()
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.random.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.random.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(seed)
    cuda.manual_seed_all = lambda seed: torch.default_generator.manual_seed(seed)
    cuda.nvtx.range_push = none()
    cuda.nvtx.range_pop = none()
    cuda.is_current_stream_capturing = const(False)
    # Torch-function modes are not active inside autograd's backward, where Megatron's collectives
    # also allocate on the current device: redirect the factory functions themselves too.
    for name in (
        "empty",
        "zeros",
        "ones",
        "full",
        "tensor",
        "arange",
        "rand",
        "randn",
        "randint",
        "empty_strided",
    ):
        setattr(torch, name, _cpu_factory(getattr(torch, name)))
    torch.accelerator.current_device_index = const(0)
    torch.accelerator.set_device_index = none()
    import torch.utils.data._utils.pin_memory as pin

    pin.pin_memory = lambda data, *a, **k: data  # the loader's pin-memory thread: nothing to pin
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")


def main() -> None:
    install()
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
