"""Write Megatron ``torch_dist`` checkpoints one tensor at a time, for converters.

A ``torch_dist`` checkpoint is a PyTorch distributed-checkpoint (DCP) directory whose tensors are
keyed by Megatron's global sharded keys (``decoder.layers.mlp.linear_fc1.weight`` with the layers
stacked on a leading axis, each layer its own chunk), plus ``metadata.json`` naming the backend and
``common.pt`` with the non-tensor state. Megatron reshards it to any tensor/pipeline layout on load.

:func:`save_torch_dist` plans every chunk from shapes alone and asks for each chunk's data only when
it is written, so peak memory is about one parameter, not the model. The layout comes from a model
built on the ``meta`` device at TP=PP=1 (:func:`checkpoint_layout`), so it is exactly Megatron's.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from megatron_sdar import compat
from megatron_sdar.atomic import atomic_write_text

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

    The checkpoint is written under a temporary name and renamed into place, and the tracker file is
    replaced last, so a failure never leaves a checkpoint that Megatron would pick up.
    """
    import torch.distributed.checkpoint as dcp

    final = os.path.join(save_dir, tag)
    if os.path.exists(final) or os.path.exists(os.path.join(save_dir, TRACKER)):
        if not overwrite:
            raise FileExistsError(f"{save_dir} already holds a checkpoint; pass --overwrite to replace it")
    os.makedirs(save_dir, exist_ok=True)
    tmp = os.path.join(save_dir, f".{tag}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        writer = dcp.FileSystemWriter(tmp, single_file_per_rank=True, thread_count=1, sync_files=True)
        dcp.save({}, storage_writer=writer, planner=_lazy_planner(layout, fetch, dtype), no_dist=True)
        with open(os.path.join(tmp, "metadata.json"), "w") as f:
            json.dump(METADATA, f)
        torch.save(common, os.path.join(tmp, "common.pt"))
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(os.path.join(save_dir, TRACKER), tag)
    return final


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

    dcp.load({}, storage_reader=dcp.FileSystemReader(checkpoint), planner=RegionLoadPlanner(), no_dist=True)
    return buffer


def stored_dtypes(checkpoint: str) -> dict[str, torch.dtype]:
    """The dtype each tensor of a ``torch_dist`` checkpoint is stored in, by global key (from its
    metadata; no tensor data is read)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(checkpoint).read_metadata()
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
