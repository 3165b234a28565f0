"""Write Megatron ``torch_dist`` checkpoints one tensor at a time, for converters.

A ``torch_dist`` checkpoint is a PyTorch distributed-checkpoint (DCP) directory whose tensors are
keyed by Megatron's global sharded keys (``decoder.layers.mlp.linear_fc1.weight`` with the layers
stacked on a leading axis, each layer its own chunk), plus ``metadata.json`` naming the backend and
``common.pt`` with the non-tensor state. Megatron reshards it to any tensor/pipeline layout on load.

:func:`save_torch_dist` plans every chunk from shapes alone and asks for each chunk's data only when
it is written, so peak memory is about one parameter, not the model. The layout comes from a model
built on the ``meta`` device at TP=PP=1 (:func:`checkpoint_layout`), so it is exactly Megatron's.
:class:`Progress` reports a long conversion's rate and time left on stderr.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from megatron_sdar import compat
from megatron_sdar.atomic import atomic_directory, atomic_write_text

METADATA = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}
TRACKER = "latest_checkpointed_iteration.txt"


@dataclass(frozen=True)
class Chunk:
    """One stored piece of a global tensor, and where its data comes from."""

    key: str  # global checkpoint key
    global_shape: tuple[int, ...]
    offset: tuple[int, ...]
    shape: tuple[int, ...]  # chunk shape, prepended axes included
    dtype: torch.dtype
    param: str  # the model's (TP=PP=1) parameter name
    param_slice: tuple[slice, ...]  # the part of that parameter this chunk holds


@dataclass
class Layout:
    """Everything Megatron stores for a model: tensor chunks and (small) objects by unique key."""

    chunks: list[Chunk]
    objects: dict[str, Any]


def checkpoint_layout(model: torch.nn.Module) -> Layout:
    """What Megatron stores for ``model`` (built at TP=PP=1; meta tensors are fine)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories

    sharded = model.sharded_state_dict()
    apply_factories(sharded)
    chunks = []
    objects: dict[str, list] = {}
    for param, value in sharded.items():
        for st in value if isinstance(value, list) else [value]:
            if isinstance(st, ShardedObject):  # e.g. layers' _extra_state, stored as torch.save([data])
                objects.setdefault(st.unique_key, []).append(st.data)
                continue
            if not isinstance(st, ShardedTensor):
                raise TypeError(f"{param}: cannot store {type(st).__name__} in a converted checkpoint")
            pre = st.prepend_axis_num
            local = tuple(st.data.shape)
            piece = tuple(slice(o, o + n) for o, n in zip(st.global_offset[pre:], local))
            chunks.append(
                Chunk(
                    key=st.key,
                    global_shape=tuple(st.global_shape),
                    offset=tuple(st.global_offset),
                    shape=(1,) * pre + local,
                    dtype=st.dtype,
                    param=param,
                    param_slice=piece,
                )  # fmt: skip
            )
    return Layout(chunks, objects)


def _lazy_planner(layout: Layout, fetch: Callable[[str], torch.Tensor], dtype: torch.dtype | None):
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    class LazySavePlanner(DefaultSavePlanner):
        """Plans the given chunks; fetches a chunk's parameter only when it is written."""

        def __init__(self) -> None:
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
            self.by_index = {(c.key, torch.Size(c.offset)): c for c in layout.chunks}
            self.cached: tuple[str, torch.Tensor] | None = None

        def create_local_plan(self) -> SavePlan:
            items = [
                WriteItem(
                    index=MetadataIndex(c.key, torch.Size(c.offset)),
                    type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=ChunkStorageMetadata(offsets=torch.Size(c.offset), sizes=torch.Size(c.shape)),
                        properties=TensorProperties(dtype=dtype or c.dtype),
                        size=torch.Size(c.global_shape),
                    ),
                )
                for c in layout.chunks
            ]
            items += [
                WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO) for key in layout.objects
            ]
            self.plan = SavePlan(items)
            return self.plan

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                buffer = io.BytesIO()
                torch.save(layout.objects[write_item.index.fqn], buffer)
                buffer.seek(0)
                return buffer
            chunk = self.by_index[(write_item.index.fqn, torch.Size(write_item.index.offset))]
            if self.cached is None or self.cached[0] != chunk.param:
                self.cached = (chunk.param, fetch(chunk.param))  # one parameter in memory at a time
            data = self.cached[1][chunk.param_slice].reshape(chunk.shape)
            expected = tuple(chunk.shape)
            if tuple(data.shape) != expected:
                raise ValueError(
                    f"{chunk.param}: got shape {tuple(data.shape)}, the model expects {expected}"
                )
            return data.to(dtype or chunk.dtype).contiguous()

    return LazySavePlanner()


def save_torch_dist(
    save_dir: str,
    layout: Layout,
    fetch: Callable[[str], torch.Tensor],
    common: dict[str, Any],
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    tag: str = "release",
) -> str:
    """Write ``save_dir/{tag}`` (+ the iteration tracker) atomically; returns the checkpoint path.

    The checkpoint is written under a temporary name (:func:`~megatron_sdar.atomic.atomic_directory`)
    and renamed into place, and the tracker file is replaced last, so a failure never leaves a
    checkpoint that Megatron would pick up; nor does it leave ``save_dir`` behind when this call
    created it. An exception raised by ``fetch`` comes out as itself, not wrapped in the
    distributed-checkpoint ``CheckpointException``.
    """
    import torch.distributed.checkpoint as dcp

    final = os.path.join(save_dir, tag)
    if os.path.exists(final) or os.path.exists(os.path.join(save_dir, TRACKER)):
        if not overwrite:
            raise FileExistsError(f"{save_dir} already holds a checkpoint; pass --overwrite to replace it")
    created = not os.path.exists(save_dir)
    os.makedirs(save_dir, exist_ok=True)
    try:
        with atomic_directory(final, overwrite=True) as tmp:
            writer = dcp.FileSystemWriter(tmp, single_file_per_rank=True, thread_count=1, sync_files=True)
            planner = _lazy_planner(layout, fetch, dtype)
            with _original_exception():
                dcp.save({}, storage_writer=writer, planner=planner, no_dist=True)
            with open(os.path.join(tmp, "metadata.json"), "w") as f:
                json.dump(METADATA, f)
            torch.save(common, os.path.join(tmp, "common.pt"))
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(save_dir)  # only if empty
        raise
    atomic_write_text(os.path.join(save_dir, TRACKER), tag)
    return final


@contextlib.contextmanager
def _original_exception() -> Iterator[None]:
    """Re-raise what a distributed-checkpoint call wrapped in its ``CheckpointException`` (it
    catches everything, ``SystemExit`` and ``KeyboardInterrupt`` included) as the original."""
    from torch.distributed.checkpoint import CheckpointException

    try:
        yield
    except CheckpointException as err:
        for failure in err.failures.values():
            original = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(original, BaseException):
                raise original from None
        raise


def read_region(checkpoint: str, key: str, offset: tuple[int, ...], shape: tuple[int, ...],
                dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """Read one region of a stored global tensor, whatever chunks it was saved in (any TP/PP)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan

    buffer = torch.empty(shape, dtype=dtype)

    class RegionLoadPlanner(DefaultLoadPlanner):
        def create_local_plan(self) -> LoadPlan:
            stored = self.metadata.state_dict_metadata.get(key)
            if stored is None:
                raise KeyError(f"{key} is not in the checkpoint at {checkpoint}")
            region = ChunkStorageMetadata(offsets=torch.Size(offset), sizes=torch.Size(shape))
            return LoadPlan(compat.read_items_for_chunks(key, stored, [region]))

        def lookup_tensor(self, index):
            return buffer

    try:
        with _original_exception():
            dcp.load(
                {}, storage_reader=dcp.FileSystemReader(checkpoint), planner=RegionLoadPlanner(), no_dist=True
            )
    except (KeyError, OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as err:
        raise ValueError(
            f"cannot read {key} from the checkpoint in {checkpoint}: {_first_line(err)}"
        ) from err
    return buffer


def _first_line(err: BaseException) -> str:
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return f"{type(err).__name__}: {text.strip().splitlines()[0] if text.strip() else ''}"


def stored_dtypes(checkpoint: str) -> dict[str, torch.dtype]:
    """The dtype each tensor of a ``torch_dist`` checkpoint is stored in, by global key (from its
    metadata; no tensor data is read)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = dcp.FileSystemReader(checkpoint).read_metadata()
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as err:
        raise ValueError(
            f"cannot read the tensor index (.metadata) of {checkpoint}: {_first_line(err)}"
        ) from err
    return {
        key: item.properties.dtype
        for key, item in metadata.state_dict_metadata.items()
        if isinstance(item, TensorStorageMetadata)
    }


def read_parameter(
    checkpoint: str, chunks: list[Chunk], full_shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """Assemble one (TP=PP=1) parameter from its chunks' regions in a checkpoint."""
    out = torch.empty(full_shape, dtype=dtype)
    for c in chunks:
        region = read_region(checkpoint, c.key, c.offset, c.shape, dtype)
        out[c.param_slice] = region.reshape(out[c.param_slice].shape)
    return out


PROGRESS_EVERY_S = 5.0  # seconds between two progress lines of a conversion


class Progress:
    """Progress of a long conversion on stderr: items and bytes done, rate and time left.

    A line is printed at most every ``every`` seconds (default :data:`PROGRESS_EVERY_S`), so a short
    run prints none; :meth:`done` closes with the total time when a line was printed.
    """

    def __init__(self, label: str, items: int, total_bytes: int, unit: str = "parameters",
                 every: float | None = None, stream: Any = None) -> None:  # fmt: skip
        self.label, self.unit, self.stream = label, unit, stream
        self.every = PROGRESS_EVERY_S if every is None else every
        self.items, self.total_bytes = items, total_bytes
        self.count = 0
        self.bytes = 0
        self.start = self.last = time.monotonic()
        self.printed = False

    def step(self, nbytes: int, count: int = 1) -> None:
        self.count += count
        self.bytes += nbytes
        now = time.monotonic()
        if now - self.last < self.every or self.count >= self.items:
            return
        self.last = now
        elapsed = now - self.start
        rate = self.bytes / elapsed if elapsed > 0 else 0.0
        left = (self.total_bytes - self.bytes) / rate if rate > 0 else float("nan")
        self._print(
            f"{self.label}: {self.count}/{self.items} {self.unit}, "
            f"{_gb(self.bytes)}/{_gb(self.total_bytes)} GB, {rate / 2**20:.0f} MB/s, "
            f"{_duration(elapsed)} elapsed, about {_duration(left)} left"
        )

    def done(self) -> None:
        if self.printed:
            elapsed = time.monotonic() - self.start
            self._print(f"{self.label}: {self.count}/{self.items} {self.unit} in {_duration(elapsed)}")

    def _print(self, line: str) -> None:
        self.printed = True
        print(line, file=self.stream or sys.stderr, flush=True)


def _gb(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f}"


def _duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
