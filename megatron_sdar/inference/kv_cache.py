"""The decoding KV cache both back ends share: per-layer keys and values ``[b, heads, S, d]`` and
which cached positions are real (padding is never attended to)."""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, batch: int, device: torch.device) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.valid = torch.zeros(batch, 0, dtype=torch.bool, device=device)

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def attention_mask(self, self_mask: torch.Tensor) -> torch.Tensor:
        """``[b, 1, n, S + n]``: the valid cache, then ``self_mask [b, n, n]`` over the new tokens."""
        b, n, _ = self_mask.shape
        return torch.cat([self.valid[:, None, :].expand(b, n, self.length), self_mask], dim=-1)[:, None]

    def extend(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, write: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[cache ; new]`` to attend to; the first ``write`` new ones are kept."""
        keys = k if self.keys[layer] is None else torch.cat([self.keys[layer], k], dim=2)
        values = v if self.values[layer] is None else torch.cat([self.values[layer], v], dim=2)
        if write:
            self.keys[layer] = keys[:, :, : self.length + write]
            self.values[layer] = values[:, :, : self.length + write]
        return keys, values

    def commit(self, key_valid: torch.Tensor, write: int) -> None:
        """After all layers: mark the ``write`` appended positions real where ``key_valid`` says so."""
        if write:
            self.valid = torch.cat([self.valid, key_valid[:, :write]], dim=1)
