"""Masks, split plans and RoPE tables derived once per layout tensor and shared by all layers."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from megatron_sdar.attention.flex import build_block_mask
from megatron_sdar.attention.split import build_split_plan
from megatron_sdar.masks import CleanAttention, dense_sdar_mask
from megatron_sdar.positions import PositionRotaryEmbedding


class SDARMaskCache:
    """Masks derived from layout tensors, keyed on the layout's memory and version.

    Every layer receives the same layout tensor for a micro-batch, and an activation-recompute
    replay receives a detached alias of it (same storage, same version counter), so a key made of
    storage address, offset, shape, strides and version finds the mask the first layer built in
    both cases. An in-place change bumps the version and forces a rebuild. Entries hold a reference
    to their layout, so a cached storage address cannot be reused by another tensor. Entries are
    kept for the micro-batches a pipeline schedule has in flight (each takes about two: its mask or
    split plan and its RoPE tables, and as many host copies), so a recompute replay in backward still
    finds them; masks and plans are small next to the activations they serve.
    """

    def __init__(self, max_entries: int = 32, split_band: str = "auto") -> None:
        self.max_entries = max_entries
        self.split_band = split_band  # the split back end's band kernel (build_split_plan's ``band``)
        self._host: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._entries: OrderedDict[tuple, tuple[torch.Tensor, Any]] = OrderedDict()
        self.builds = 0  # number of masks built (RoPE tables not counted); tests use it to check sharing

    @staticmethod
    def _key(layout: torch.Tensor, *what: Any) -> tuple:
        return (
            layout.device,
            layout.untyped_storage().data_ptr(),
            layout.storage_offset(),
            tuple(layout.shape),
            layout.stride(),
            layout.dtype,
            layout._version,
            *what,
        )

    def _lookup(self, key: tuple, layout: torch.Tensor, build: Callable[[], Any]) -> tuple[Any, bool]:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            return entry[1], False
        with torch.no_grad():
            value = build()
        self._entries[key] = (layout, value)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return value, True

    def get(self, layout: torch.Tensor, clean_attention: CleanAttention, backend: str) -> Any:
        def build() -> Any:
            if backend == "flex":
                return build_block_mask(layout, clean_attention, compile=layout.is_cuda)
            if backend == "split":
                return build_split_plan(layout, clean_attention, self.split_band, self.host_copy(layout))
            return dense_sdar_mask(layout, clean_attention)

        mask, built = self._lookup(self._key(layout, clean_attention, backend), layout, build)
        self.builds += built
        return mask

    def rope_tables(
        self,
        layout: torch.Tensor,
        rotary: PositionRotaryEmbedding,
        dtype: torch.dtype,
        position_ids: Callable[[], torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos/sin tables for the ``[b, s]`` ``position_ids()`` the layout carries, shared like
        the masks (one build per micro-batch for all layers)."""
        key = self._key(layout, "rope", rotary.dim, rotary.rotary_base, dtype)
        return self._lookup(key, layout, lambda: rotary.tables(position_ids(), dtype))[0]

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
        key = self._key(layout)
        self._host[key] = (layout, host)
        self._host.move_to_end(key)
        while len(self._host) > self.max_entries:
            self._host.popitem(last=False)

    def host_copy(self, layout: torch.Tensor) -> torch.Tensor | None:
        """The host copy recorded for ``layout`` (same tensor memory and version), if any."""
        key = self._key(layout)
        entry = self._host.get(key)
        if entry is None:
            return None
        self._host.move_to_end(key)
        return entry[1]

    def clear(self) -> None:
        self._entries.clear()
        self._host.clear()


MASK_CACHE = SDARMaskCache()
