"""The causal-LM baseline (``--sdar-objective ar``) over the same architecture."""

from __future__ import annotations

from typing import Any

import torch

from megatron_sdar.attention.core import CausalCoreAttention
from megatron_sdar.model.base import RoPEInCoreModel


class ARModel(RoPEInCoreModel):
    """The causal-LM baseline (``--sdar-objective ar``) with RoPE applied in its core attention.

    Same parameters, state-dict keys and loss as ``GPTModel``: the only change is where RoPE runs.
    Its :class:`~megatron_sdar.attention.CausalCoreAttention` layers receive the position ids
    ``[b, 1, s]`` as ``attention_mask`` and rotate query and key with one compiled kernel, as the SDAR
    model does, so the two objectives are compared with the same kernels. For the local layer spec
    (:func:`ar_layer_spec` without Transformer Engine; with TE, use ``GPTModel``, TE fuses RoPE).
    """

    core_attention_type = CausalCoreAttention
    description = "the AR baseline"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self._rope_in_core and len(self.decoder.layers) > 0:  # a stage may hold no layers
            raise ValueError(
                "ARModel applies RoPE in CausalCoreAttention (the local spec from ar_layer_spec); "
                "with Transformer Engine build a GPTModel"
            )

    def forward(
        self,
        input_ids: torch.Tensor | None,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError("the AR baseline is causal over the window: pass attention_mask=None")
        positions = position_ids.to(torch.int32).unsqueeze(1)  # [b, 1, s]: read by the core attention
        return super().forward(input_ids, position_ids, positions, **kwargs)
