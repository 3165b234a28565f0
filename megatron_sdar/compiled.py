"""Elementwise pieces compiled into fused kernels on CUDA, run eagerly elsewhere.

Without Transformer Engine nothing fuses RoPE or the split attention's merge: eager torch runs them
as chains of small memory-bound kernels. ``torch.compile`` turns each into one or two kernels; on
the CPU (tests, CI) the same function runs eagerly, so one definition serves both.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


def compiled_on_cuda(fn: Callable | None = None, *, dynamic: bool | None = None) -> Callable:
    """``fn`` compiled (lazily, once per process) when its first argument is a CUDA tensor, eager
    otherwise or when already inside a compiled region; ``.eager`` is the plain function.
    ``dynamic=False`` specialises on shapes (sizes fixed for a run)."""
    if fn is None:
        return functools.partial(compiled_on_cuda, dynamic=dynamic)
    compiled = functools.cache(lambda: torch.compile(fn, dynamic=dynamic))

    @functools.wraps(fn)
    def run(*args):
        if args[0].is_cuda and not torch.compiler.is_compiling():
            return compiled()(*args)
        return fn(*args)

    run.eager = fn
    return run
