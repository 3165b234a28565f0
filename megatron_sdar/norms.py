"""Plain-torch norms that work under sequence parallelism.

Megatron-Core's torch fallback for norms (``WrappedTorchNorm``) refuses sequence parallelism, so
without Transformer Engine or Apex a local-spec model cannot use it. This norm is the same
RMSNorm/LayerNorm, with its parameters marked ``sequence_parallel`` the way TE's and Apex's norms
mark theirs, so Megatron's gradient finalisation sums them over the tensor-parallel group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig


class SequenceParallelTorchNorm(torch.nn.Module):
    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ) -> None:
        super().__init__()
        if config.normalization not in ("RMSNorm", "LayerNorm"):
            raise ValueError(f"normalization {config.normalization} is not supported (RMSNorm, LayerNorm)")
        if config.layernorm_zero_centered_gamma:
            raise ValueError("zero-centered gamma is not supported by the torch norm")
        self.normalization = config.normalization
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = (
            torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
            if self.normalization == "LayerNorm"
            else None
        )
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalization == "RMSNorm":
            return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps)
        return F.layer_norm(x, (self.hidden_size,), self.weight, self.bias, self.eps)
