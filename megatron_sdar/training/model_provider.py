"""Megatron's model provider: the SDAR model, or the same architecture as a causal LM (the AR baseline)."""

from __future__ import annotations

from typing import Any

import torch

from megatron_sdar.training.arguments import sdar_config_from_args


def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None,
                   config: Any = None, pg_collection: Any = None) -> torch.nn.Module:  # fmt: skip
    """Build this stage's model from Megatron's parsed arguments."""
    from megatron.core.models.gpt import GPTModel
    from megatron.training import get_args
    from megatron.training.arguments import core_transformer_config_from_args

    from megatron_sdar.model.ar import ARModel
    from megatron_sdar.model.sdar import SDARModel
    from megatron_sdar.model.specs import ar_layer_spec, sdar_layer_spec

    args = get_args()
    transformer_config = config if config is not None else core_transformer_config_from_args(args)
    use_te = args.transformer_impl == "transformer_engine"
    common = dict(
        config=transformer_config,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        rotary_base=args.rotary_base,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
    )
    if args.sdar_objective == "ar":
        spec = ar_layer_spec(transformer_config, use_te, vp_stage)
        model_class = GPTModel if use_te else ARModel  # TE fuses RoPE itself
        return model_class(transformer_layer_spec=spec, position_embedding_type="rope", **common)
    sdar = sdar_config_from_args(args)
    if args.pipeline_model_parallel_size > 1:
        # Megatron's schedules size the tensors sent between stages from --seq-length (L), but the
        # SDAR model's stages exchange [x_t ; x_0], 2L positions: with variable sequence lengths the
        # schedules send each tensor's shape first (a few bytes per send) instead of assuming it
        transformer_config.variable_seq_lengths = True
    return SDARModel(
        transformer_layer_spec=sdar_layer_spec(transformer_config, sdar, use_te, vp_stage),
        sdar_config=sdar,
        **common,
    )
