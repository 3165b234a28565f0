"""Block-diffusion and AR decoding for SDAR models: HF and Megatron back ends, strategies, sampling."""

from megatron_sdar.inference.generate import GenerationResult, generate_ar, generate_block_diffusion
from megatron_sdar.inference.hf_backend import HFBackend, load_hf_model
from megatron_sdar.inference.megatron_backend import MegatronBackend
from megatron_sdar.inference.sampling import SamplingConfig, choose_tokens
from megatron_sdar.inference.strategies import STRATEGIES, StrategyConfig, select, static_quota

__all__ = [
    "STRATEGIES",
    "GenerationResult",
    "HFBackend",
    "MegatronBackend",
    "SamplingConfig",
    "StrategyConfig",
    "choose_tokens",
    "generate_ar",
    "generate_block_diffusion",
    "load_hf_model",
    "select",
    "static_quota",
]
