#!/usr/bin/env python3
"""Convert a Megatron ``torch_dist`` checkpoint (any TP/PP it was saved at) to a HF checkpoint.

    python tools/convert_mcore_to_hf.py --load ckpt/qwen3-sdar --save hf/qwen3-sdar            # SDAR
    python tools/convert_mcore_to_hf.py --load ckpt/qwen3-sdar --save hf/qwen3-ar --format ar  # plain

``--format sdar`` (default) keeps Qwen3/Llama parameter names and writes the SDAR config fields
(``architectures: ["SDARForCausalLM"]``, ``model_type: "sdar"``, ``block_size``,
``mask_token_id``); ``--format ar`` writes a plain ``Qwen3ForCausalLM``/``LlamaForCausalLM`` that
``transformers`` loads as is. The architecture comes from ``sdar_architecture.json`` next to the
checkpoint (written by convert_hf_to_mcore.py) or, for a checkpoint written by ``pretrain_sdar.py``,
from the Megatron arguments stored in it (its tokenizer directory is copied too).
Tensors are read one parameter at a time and written in safetensors shards with an index.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sdar import compat  # noqa: E402

compat.ignore_known_warnings()  # the megatron-core / torch notices named there, nothing else

from megatron_sdar.atomic import atomic_directory, refuse_to_replace  # noqa: E402
from megatron_sdar.conversion.hf import DTYPES  # noqa: E402

HF_CLASSES = {
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
    "llama": ("LlamaForCausalLM", "llama"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="Megatron checkpoint directory (with the iteration tracker)")
    p.add_argument("--save", required=True)
    p.add_argument("--format", choices=["sdar", "ar"], default="sdar")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--iteration", default=None, help="iteration to convert (default: the latest)")
    p.add_argument(
        "--architecture",
        default=None,
        help="sdar_architecture.json (default: next to --load; a checkpoint written by training "
        "without one is described by the Megatron arguments it stores)",
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="HF vocabulary rows to keep (default: the recorded vocabulary, or the padded rows of "
        "a training checkpoint)",
    )
    p.add_argument(
        "--tokenizer-dir", default=None, help="tokenizer files to copy (default: --load/tokenizer)"
    )
    p.add_argument(
        "--block-size", type=int, default=None, help="SDAR block size (overrides the recorded one)"
    )
    p.add_argument("--mask-token-id", type=int, default=None, help="overrides the recorded mask token id")
    p.add_argument("--max-shard-size-mb", type=int, default=2048)
    p.add_argument("--overwrite", action="store_true")
    return p


def hf_config(arch, fmt: str) -> dict:
    cls, model_type = HF_CLASSES[arch.family]
    config = {
        "architectures": [cls],
        "model_type": model_type,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.ffn_hidden_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_query_groups,
        "head_dim": arch.kv_channels,
        "vocab_size": arch.vocab_size,
        "max_position_embeddings": arch.max_position_embeddings,
        "rms_norm_eps": arch.norm_epsilon,
        "rope_theta": arch.rotary_base,
        "tie_word_embeddings": arch.tied_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "torch_dtype": "bfloat16",
    }
    if arch.num_experts:
        config.update(
            num_experts=arch.num_experts, num_experts_per_tok=arch.moe_router_topk,
            moe_intermediate_size=arch.moe_ffn_hidden_size, norm_topk_prob=arch.moe_norm_topk_prob,
            router_aux_loss_coef=arch.moe_aux_loss_coeff, decoder_sparse_step=1, mlp_only_layers=[],
        )  # fmt: skip
    if fmt == "sdar":
        if arch.mask_token_id is None or arch.block_size is None:
            raise SystemExit("error: --format sdar needs the mask token id and block size (record them at "
                             "conversion or pass --mask-token-id and --block-size)")  # fmt: skip
        config.update(
            architectures=["SDARMoeForCausalLM" if arch.num_experts else "SDARForCausalLM"],
            model_type="sdar", base_model_type=model_type,
            block_size=arch.block_size, mask_token_id=arch.mask_token_id,
        )  # fmt: skip
    return config


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    import torch
    from safetensors.torch import save_file

    from megatron_sdar.conversion.mapping import AttentionShape, hf_params_from_mcore
    from megatron_sdar.conversion.megatron import checkpoint_architecture, meta_model, resolve_checkpoint
    from megatron_sdar.conversion.torch_dist import checkpoint_layout, read_parameter

    try:
        ckpt = resolve_checkpoint(args.load, args.iteration)
        arch, saved = checkpoint_architecture(args.load, ckpt, args.vocab_size, args.architecture)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    arch.block_size = args.block_size or arch.block_size
    arch.mask_token_id = args.mask_token_id if args.mask_token_id is not None else arch.mask_token_id
    config_json = hf_config(arch, args.format)
    try:
        refuse_to_replace(args.save, args.overwrite)
    except FileExistsError as err:
        raise SystemExit(f"error: {err}") from None

    meta = meta_model(arch)
    layout = checkpoint_layout(meta)
    by_param: dict[str, list] = {}
    for chunk in layout.chunks:
        by_param.setdefault(chunk.param, []).append(chunk)
    shapes = {n: tuple(p.shape) for n, p in meta.named_parameters()}
    shape = AttentionShape(arch.num_attention_heads, arch.num_query_groups, arch.kv_channels)
    dtype = getattr(torch, DTYPES[args.dtype])

    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, files = 0, []

    def flush(tmp: str) -> None:
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
            files.append(name)
            weight_map.update({k: name for k in shard})
            shard, shard_bytes = {}, 0

    with atomic_directory(args.save, overwrite=args.overwrite) as tmp:
        for param, chunks in by_param.items():
            loaded = read_parameter(ckpt, chunks, shapes[param], chunks[0].dtype)
            if param in ("embedding.word_embeddings.weight", "output_layer.weight"):
                loaded = loaded[: arch.vocab_size]
            for name, tensor in hf_params_from_mcore(param, loaded, shape).items():
                shard[name] = tensor.to(dtype).contiguous()
                shard_bytes += tensor.numel() * tensor.element_size()
            if shard_bytes >= args.max_shard_size_mb * 2**20:
                flush(tmp)
        flush(tmp)
        if len(files) > 1:
            total = sum(os.path.getsize(os.path.join(tmp, f)) for f in files)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        else:
            os.replace(os.path.join(tmp, files[0]), os.path.join(tmp, "model.safetensors"))
        config_json["torch_dtype"] = DTYPES[args.dtype]
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config_json, f, indent=2)
        tokenizer_dir = args.tokenizer_dir or os.path.join(args.load, "tokenizer")
        if not os.path.isdir(tokenizer_dir) and saved is not None:
            tokenizer_dir = getattr(saved, "tokenizer_model", None) or ""
        if os.path.isdir(tokenizer_dir):
            for name in os.listdir(tokenizer_dir):
                shutil.copy2(os.path.join(tokenizer_dir, name), os.path.join(tmp, name))
    print(f"wrote {args.save} ({len(weight_map)} tensors, {args.format}, {args.dtype})")
    return {"path": args.save, "config": config_json}


if __name__ == "__main__":
    main()
