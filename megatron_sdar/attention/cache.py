"""Masks, split plans and RoPE tables derived once per layout tensor and shared by all layers.

Everything here rests on one identity rule, :func:`tensor_key`; the model owns an
:class:`SDARMaskCache` and hands it to its core attentions.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from megatron_sdar.attention.flex import build_block_mask
from megatron_sdar.attention.split import build_split_plan
from megatron_sdar.compat import tensor_version
from megatron_sdar.masks import CleanAttention, dense_sdar_mask
from megatron_sdar.positions import PositionRotaryEmbedding


def tensor_key(tensor: torch.Tensor) -> tuple:
    """The identity rule every reuse in this package relies on, written once.

    Two tensors with the same key hold the same values while the first one is alive: same device,
    memory, offset, shape, strides and dtype, and no in-place change since (the version counter is
    shared by views and detached aliases). So every layer of a micro-batch, and an activation
    recompute replay (which receives a detached alias), finds what the first layer derived, while a
    copy with equal values (another micro-batch) or an in-place edit does not. Whoever keeps a key
    keeps a reference to the tensor as well, so that its memory cannot pass to another tensor.
    """
    return (
        tensor.device,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tensor.stride(),
        tensor.dtype,
        tensor_version(tensor),
    )


class TensorKeyedCache:
    """Values derived from tensors, found again by :func:`tensor_key` (least recently used first out).

    Entries hold their source tensors (see :func:`tensor_key`)."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, tuple[tuple[torch.Tensor, ...], Any]] = OrderedDict()

    @staticmethod
    def _key(tensors: tuple[torch.Tensor, ...], what: tuple) -> tuple:
        return (*(tensor_key(t) for t in tensors), *what)

    def find(self, tensors: tuple[torch.Tensor, ...], what: tuple = ()) -> Any:
        """The value stored for these tensors (same identity) and ``what``, or ``None``."""
        key = self._key(tensors, what)
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, tensors: tuple[torch.Tensor, ...], what: tuple, value: Any) -> None:
        key = self._key(tensors, what)
        self._entries[key] = (tensors, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def get(
        self, tensors: tuple[torch.Tensor, ...], what: tuple, build: Callable[[], Any]
    ) -> tuple[Any, bool]:
        """``(value, built)``: the stored value, or ``build()`` (without autograd) stored and returned."""
        value = self.find(tensors, what)
        if value is not None:
            return value, False
        with torch.no_grad():
            value = build()
        self.put(tensors, what, value)
        return value, True

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class SDARMaskCache:
    """Masks, split plans and RoPE tables derived from layout tensors (keyed by :func:`tensor_key`).

    Every layer receives the same layout tensor for a micro-batch, so one build serves all of them
    and the recompute replays. Entries are kept for the micro-batches a pipeline schedule has in
    flight (each takes about two: its mask or split plan and its RoPE tables, and as many host
    copies), so a recompute replay in backward still finds them; masks and plans are small next to
    the activations they serve. One model owns one cache and hands it to its core attentions.
    """

    def __init__(self, max_entries: int = 32, split_band: str = "auto") -> None:
        self.max_entries = max_entries
        self.split_band = split_band  # the split back end's band kernel (build_split_plan's ``band``)
        self._entries = TensorKeyedCache(max_entries)
        self._host = TensorKeyedCache(max_entries)
        self.builds = 0  # number of masks built (RoPE tables not counted); tests use it to check sharing

    def get(
        self,
        layout: torch.Tensor,
        clean_attention: CleanAttention,
        backend: str,
        indices: tuple[tuple, torch.Tensor, torch.Tensor] | None = None,
    ) -> Any:
        """The mask (or split plan) of ``layout`` for the back end. ``indices`` ``(key, queries,
        keys)`` restricts the queries and keys to those positions of the ``2L`` sequence, in that
        order (a context-parallel rank's, identified by ``key``)."""
        rows, cols = (None, None) if indices is None else indices[1:]

        def build() -> Any:
            if backend == "flex":
                return build_block_mask(
                    layout, clean_attention, compile=layout.is_cuda, query_index=rows, key_index=cols
                )
            if backend == "split":
                if rows is not None:
                    raise ValueError("the split back end does not restrict its queries (context parallelism)")
                return build_split_plan(layout, clean_attention, self.split_band, self.host_copy(layout))
            mask = dense_sdar_mask(layout, clean_attention)
            return mask if rows is None else mask.index_select(2, rows).index_select(3, cols)

        what = ("mask", clean_attention, backend, None if indices is None else indices[0])
        mask, built = self._entries.get((layout,), what, build)
        self.builds += built
        return mask

    def rope_tables(
        self,
        layout: torch.Tensor,
        rotary: PositionRotaryEmbedding,
        dtype: torch.dtype,
        position_ids: Callable[[], torch.Tensor],
        variant: tuple = (),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos/sin tables for the ``[b, s]`` ``position_ids()`` the layout carries, shared like
        the masks (one build per micro-batch for all layers); ``variant`` tells apart tables built
        from the same layout for other positions (a context-parallel rank's)."""
        what = ("rope", rotary.dim, rotary.rotary_base, dtype, *variant)
        return self._entries.get((layout,), what, lambda: rotary.tables(position_ids(), dtype))[0]

    def set_host_copy(self, layout: torch.Tensor, host: torch.Tensor) -> None:
        """Record that ``host`` (a CPU tensor) holds ``layout``'s document and block rows, so what
        needs them on the host (the split plan) reads no device memory. The training loop has the
        data loader's copy; a later in-place change of ``layout`` invalidates the record."""
        if (
            host.device.type != "cpu"
            or host.shape[0] != layout.shape[0]
            or host.shape[-1] != layout.shape[-1]
        ):
            raise ValueError(
                f"host copy {list(host.shape)} on {host.device} does not match the layout "
                f"{list(layout.shape)}"
            )
        self._host.put((layout,), (), host)

    def host_copy(self, layout: torch.Tensor) -> torch.Tensor | None:
        """The host copy recorded for ``layout`` (same tensor memory and version), if any."""
        return self._host.find((layout,))

    def clear(self) -> None:
        self._entries.clear()
        self._host.clear()
