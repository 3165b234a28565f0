"""Shared test helpers: a single-process Megatron world and tiny SDAR models."""

from __future__ import annotations

import os
from typing import Any

import torch

from megatron_sdar.config import SDARConfig
from megatron_sdar.local_world import free_port
from megatron_sdar.model.base import qwen3_transformer_config
from megatron_sdar.model.sdar import SDARModel, build_sdar_model


def init_megatron(
    tp: int = 1,
    pp: int = 1,
    rank: int = 0,
    world_size: int = 1,
    port: int | None = None,
    ep: int = 1,
    vpp: int = 1,
    etp: int | None = None,
    cp: int = 1,
) -> None:
    """Initialise torch.distributed over gloo and Megatron's model-parallel groups (idempotent)."""
    from megatron.core import parallel_state

    if not torch.distributed.is_initialized():
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port if port is not None else free_port())
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep,
            expert_tensor_parallel_size=etp,
            virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
            context_parallel_size=cp,
        )


TINY = dict(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    kv_channels=16,
    ffn_hidden_size=128,
)


def tiny_model(
    sdar: SDARConfig | None = None,
    vocab_size: int = 128,
    seq_length: int = 64,
    tied: bool = False,
    seed: int = 0,
    rotary_base: float = 10000.0,
    vp_stage: int | None = None,
    **config_overrides: Any,
) -> SDARModel:
    """A tiny Qwen3-shaped SDAR model in fp32 on CPU."""
    sdar = sdar or SDARConfig(block_size=4, mask_token_id=vocab_size - 1)
    torch.manual_seed(seed)
    from megatron.core import parallel_state

    overrides = {
        **TINY,
        "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
        **config_overrides,
    }
    config = qwen3_transformer_config(use_cpu_initialization=True, params_dtype=torch.float32, **overrides)
    return build_sdar_model(
        config,
        sdar,
        vocab_size=vocab_size,
        max_sequence_length=2 * seq_length,
        share_embeddings_and_output_weights=tied,
        rotary_base=rotary_base,
        vp_stage=vp_stage,
    )


def megatron_twin(hf: Any, sdar: SDARConfig, seq_length: int = 32) -> SDARModel:
    """The weights of a tiny HF Qwen3/Llama (``tests.test_conversion.hf_model``) in a Megatron SDAR
    model at TP=1, in eval mode (initialises the single-process Megatron world)."""
    from megatron_sdar.conversion.mapping import AttentionShape, hf_to_mcore_state_dict

    init_megatron()
    cfg = hf.config
    model = tiny_model(
        sdar, vocab_size=cfg.vocab_size, seq_length=seq_length, tied=cfg.tie_word_embeddings,
        num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_key_value_heads,
        kv_channels=cfg.head_dim, ffn_hidden_size=cfg.intermediate_size,
        qk_layernorm=cfg.model_type == "qwen3", rotary_base=cfg.rope_parameters["rope_theta"],
    )  # fmt: skip
    shape = AttentionShape(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
    state = hf_to_mcore_state_dict(hf.state_dict(), shape, cfg.num_hidden_layers, cfg.tie_word_embeddings)
    model.load_state_dict(state, strict=False)
    return model.eval()


def sdar_checkpoint(tmp_path: Any, block_size: int = 4) -> tuple[Any, Any, int]:
    """The BPE-tokenised HF Llama of ``tests.test_convert_tool`` converted to a Megatron SDAR
    checkpoint with a new ``<|mask|>`` token: (HF folder, checkpoint folder, mask token id)."""
    from tests.test_convert_tool import _tokenizer_and_model
    from tools import convert_hf_to_mcore

    src, _, mask_id = _tokenizer_and_model(tmp_path)  # the added mask token takes the next row
    ckpt = tmp_path / "ckpt"
    convert_hf_to_mcore.main(
        ["--hf-dir", str(src), "--save", str(ckpt), "--dtype", "fp32", "--mask-token", "<|mask|>",
         "--block-size", str(block_size)]
    )  # fmt: skip
    return src, ckpt, mask_id


def sdar_export(tmp_path: Any, block_size: int = 4) -> tuple[Any, Any, int]:
    """:func:`sdar_checkpoint` exported back to a HF SDAR folder (fp32):
    (HF source folder, SDAR export folder, mask token id)."""
    from tools import convert_mcore_to_hf

    src, ckpt, mask_id = sdar_checkpoint(tmp_path, block_size)
    export = tmp_path / "sdar"
    convert_mcore_to_hf.main(["--load", str(ckpt), "--save", str(export), "--dtype", "fp32"])
    return src, export, mask_id
