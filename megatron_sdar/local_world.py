"""A one-process Megatron world for tools that build models on the CPU (converters)."""

from __future__ import annotations

import os
import socket

import torch


def free_port() -> int:
    """A TCP port that is free on this host right now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_single_process_world() -> None:
    """Initialise torch.distributed (gloo, one rank) and Megatron's TP=PP=1 groups if not done yet."""
    from megatron.core import parallel_state

    if not torch.distributed.is_initialized():
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(free_port())
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
