"""Plain-torch norms for the local (no Transformer Engine, no Apex) layer spec.

Megatron-Core's torch fallback (``WrappedTorchNorm``) has two costs this norm removes:

* it refuses sequence parallelism; here the parameters are marked ``sequence_parallel`` the way
  TE's and Apex's norms mark theirs, so Megatron's gradient finalisation sums them over the
  tensor-parallel group;
* eager ``RMSNorm`` on the GPU runs as a chain of separate elementwise and reduction kernels (cast,
  square, mean, rsqrt, two products, and as many again backward), each a full pass over the
  activations; four norms per layer made them a large share of an SDAR step. On CUDA the norm runs
  as one ``torch.compile``-generated kernel each way (fp32 statistics, as TE computes them).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps).to(x.dtype)


@functools.cache
def _fused(name: str):
    """The compiled norm function (compiled lazily, once per process)."""
    return torch.compile(_rms_norm if name == "RMSNorm" else _layer_norm)


class TorchNorm(torch.nn.Module):
    """RMSNorm or LayerNorm over the last dimension, compiled on CUDA, sequence-parallel aware."""

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
        if x.is_cuda and not torch.compiler.is_compiling():
            if self.normalization == "RMSNorm":
                return _fused("RMSNorm")(x, self.weight, self.eps)
            return _fused("LayerNorm")(x, self.weight, self.bias, self.eps)
        if self.normalization == "RMSNorm":
            return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps)
        return F.layer_norm(x, (self.hidden_size,), self.weight, self.bias, self.eps)
