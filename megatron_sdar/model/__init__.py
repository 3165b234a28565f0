"""The SDAR model and the AR baseline: Megatron-Core's ``GPTModel`` composed through ``ModuleSpec``."""

from megatron_sdar.model.ar import ARModel
from megatron_sdar.model.base import RoPEInCoreModel, qwen3_transformer_config
from megatron_sdar.model.sdar import SDARModel, build_sdar_model, masked_loss_index, vocab_parallel_correct
from megatron_sdar.model.specs import (
    ar_layer_spec,
    sdar_layer_spec,
    with_core_attention,
    with_sdar_core_attention,
)

__all__ = [
    "ARModel",
    "RoPEInCoreModel",
    "SDARModel",
    "ar_layer_spec",
    "build_sdar_model",
    "masked_loss_index",
    "qwen3_transformer_config",
    "sdar_layer_spec",
    "vocab_parallel_correct",
    "with_core_attention",
    "with_sdar_core_attention",
]
