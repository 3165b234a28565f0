"""Layer specs: Megatron's own GPT specs with the core attention (and, without Apex, the norms) swapped
through ``ModuleSpec``."""

from __future__ import annotations

import copy
from functools import partial
from typing import Any

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_sdar.attention.core import CausalCoreAttention, SDARCoreAttention
from megatron_sdar.config import SDARConfig


def with_sdar_core_attention(spec: Any, sdar: SDARConfig) -> Any:
    """A copy of a layer or decoder-block spec whose self-attention uses SDAR core attention."""
    builder = partial(
        SDARCoreAttention, clean_attention=sdar.clean_attention, backend=sdar.attention_backend,
        kernel_options=sdar.flex_kernel_options, block_size_bound=sdar.block_size_bound,
    )  # fmt: skip
    return with_core_attention(spec, builder)


def with_core_attention(spec: Any, builder: Any) -> Any:
    """A copy of a layer or decoder-block spec whose self-attention core is ``builder``."""
    spec = copy.deepcopy(spec)

    def patch_layer(layer_spec: ModuleSpec) -> None:
        attn = getattr(layer_spec.submodules, "self_attention", None)
        subs = getattr(attn, "submodules", None)
        if subs is None or not hasattr(subs, "core_attention"):
            raise ValueError(f"layer spec {layer_spec.module} has no self-attention core to replace")
        subs.core_attention = builder

    if isinstance(spec, TransformerBlockSubmodules):
        for layer_spec in spec.layer_specs:
            patch_layer(layer_spec)
    elif isinstance(spec, ModuleSpec) and isinstance(spec.submodules, TransformerBlockSubmodules):
        for layer_spec in spec.submodules.layer_specs:
            patch_layer(layer_spec)
    else:
        patch_layer(spec)
    return spec


def sdar_layer_spec(
    config: TransformerConfig,
    sdar: SDARConfig,
    use_transformer_engine: bool = False,
    vp_stage: int | None = None,
) -> Any:
    """Megatron's GPT layer spec for ``config`` (dense; MoE through the decoder-block spec) with SDAR
    core attention. On the local spec without Apex the norms are :class:`~megatron_sdar.norms.TorchNorm`
    (compiled on CUDA; Megatron's torch norm is eager and refuses sequence parallelism)."""
    return _layer_spec(
        config, use_transformer_engine, vp_stage, lambda base: with_sdar_core_attention(base, sdar)
    )


def ar_layer_spec(
    config: TransformerConfig, use_transformer_engine: bool = False, vp_stage: int | None = None
) -> Any:
    """The same architecture for the causal-LM objective (the AR baseline, ``--sdar-objective ar``).

    Transformer Engine's spec keeps its fused attention; the local spec gets
    :class:`~megatron_sdar.attention.CausalCoreAttention` (flash SDPA) instead of Megatron's
    score-materialising ``DotProductAttention``, so both objectives run comparable kernels.
    """
    attend = (
        (lambda base: base)
        if use_transformer_engine
        else partial(with_core_attention, builder=CausalCoreAttention)
    )
    return _layer_spec(config, use_transformer_engine, vp_stage, attend)


def _layer_spec(
    config: TransformerConfig, use_transformer_engine: bool, vp_stage: int | None, attend: Any
) -> Any:
    if config.num_moe_experts:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

        base = get_gpt_decoder_block_spec(
            config, use_transformer_engine=use_transformer_engine, normalization=config.normalization,
            vp_stage=vp_stage,
        )  # fmt: skip
    elif use_transformer_engine:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        base = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    else:
        base = get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm, normalization=config.normalization)
    spec = attend(base)
    if not use_transformer_engine and not _have_apex():
        spec = _with_torch_norms(config, spec, vp_stage)
    return spec


def _have_apex() -> bool:
    try:
        import apex  # noqa: F401
    except ImportError:
        return False
    return True


def _with_torch_norms(config: TransformerConfig, spec: Any, vp_stage: int | None) -> Any:
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    from megatron_sdar.model.norms import TorchNorm as Norm

    if isinstance(spec, ModuleSpec) and isinstance(spec.submodules, TransformerBlockSubmodules):
        spec = spec.submodules
    if isinstance(spec, TransformerBlockSubmodules):
        layers = spec.layer_specs
    else:
        layers = [spec] * get_num_layers_to_build(config, vp_stage)
    patched = []
    for layer in layers:
        layer = copy.deepcopy(layer)
        subs = layer.submodules
        for name in ("input_layernorm", "pre_mlp_layernorm"):
            if getattr(subs, name, None) not in (None, IdentityOp):
                setattr(subs, name, Norm)
        attn = getattr(subs.self_attention, "submodules", None)
        for name in ("q_layernorm", "k_layernorm"):
            if getattr(attn, name, None) not in (None, IdentityOp):
                setattr(attn, name, Norm)
        patched.append(layer)
    return TransformerBlockSubmodules(layer_specs=patched, layer_norm=Norm)
