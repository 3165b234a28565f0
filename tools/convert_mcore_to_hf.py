#!/usr/bin/env python3
"""Convert a Megatron ``torch_dist`` checkpoint (any TP/PP it was saved at) to a HF checkpoint.

    python tools/convert_mcore_to_hf.py --load ckpt/qwen3-sdar --save hf/qwen3-sdar            # SDAR
    python tools/convert_mcore_to_hf.py --load ckpt/qwen3-sdar --save hf/qwen3-ar --format ar  # plain

``--format sdar`` (default) writes what the SDAR serving stack loads: Qwen3/Qwen3-MoE/Llama
parameter names, config.json with the released SDAR fields (``architectures``
``SDARForCausalLM`` / ``SDARMoeForCausalLM``, ``model_type`` ``sdar`` / ``sdar_moe``, ``block_size``,
``mask_token_id``, ``auto_map``, ...), the transformers remote-code model it points at
(``configuration_sdar.py``, ``modeling_sdar.py``, and the ``_moe`` pair), generation_config.json with
the block-diffusion decoding defaults, and the tokenizer with its ``mask_token`` named. So
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads it with transformers
4.5x or 5.x, without this package. ``--format ar`` writes a plain ``Qwen3ForCausalLM`` /
``Qwen3MoeForCausalLM`` / ``LlamaForCausalLM``. The architecture comes from ``sdar_architecture.json``
next to the checkpoint (written by convert_hf_to_mcore.py) or, for a checkpoint written by
``pretrain_sdar.py``, from the Megatron arguments stored in it (its tokenizer directory is copied too).
Tensors keep the dtype they are stored in unless ``--dtype`` names one.
Tensors are read one parameter at a time and written in safetensors shards with an index.
The folder is written under a temporary sibling name and renamed into place when complete (see
convert_hf_to_mcore.py); a long export reports its progress on stderr every few seconds.
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
from megatron_sdar.conversion import hf_export  # noqa: E402
from megatron_sdar.conversion.hf import DTYPES  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="Megatron checkpoint directory (with the iteration tracker)")
    p.add_argument("--save", required=True)
    p.add_argument("--format", choices=["sdar", "ar"], default="sdar")
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="dtype of every written tensor and of config.json torch_dtype (default: each parameter "
        "keeps the dtype it is stored in, and torch_dtype names the dtype most weights are stored in)",
    )
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
    p.add_argument(
        "--clean-attention",
        choices=["block_causal", "causal"],
        default=None,
        help="how the clean half attends to itself (default: what the checkpoint was trained with; "
        "causal for models trained with --sdar-clean-attention causal, e.g. the joint AR loss)",
    )
    p.add_argument("--mask-token-id", type=int, default=None, help="overrides the recorded mask token id")
    p.add_argument("--max-shard-size-mb", type=int, default=2048)
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    for flag, value in (
        ("--max-shard-size-mb", args.max_shard_size_mb), ("--block-size", args.block_size),
        ("--vocab-size", args.vocab_size),
    ):  # fmt: skip
        if value is not None and value < 1:
            raise SystemExit(f"error: {flag} must be a positive integer, not {value}")
    if args.mask_token_id is not None and args.mask_token_id < 0:
        raise SystemExit(f"error: --mask-token-id must not be negative, not {args.mask_token_id}")
    if args.architecture and not os.path.isfile(args.architecture):
        raise SystemExit(f"error: --architecture {args.architecture} is not a file")
    import torch
    from safetensors.torch import save_file

    from megatron_sdar.conversion.mapping import AttentionShape, hf_params_from_mcore
    from megatron_sdar.conversion.megatron import checkpoint_architecture, meta_model, resolve_checkpoint
    from megatron_sdar.conversion.torch_dist import Progress, checkpoint_layout, read_parameter, stored_dtypes

    try:
        ckpt = resolve_checkpoint(args.load, args.iteration)
        arch, saved = checkpoint_architecture(args.load, ckpt, args.vocab_size, args.architecture)
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    if args.mask_token_id is not None and args.mask_token_id >= arch.vocab_size:
        raise SystemExit(
            f"error: --mask-token-id {args.mask_token_id} is not a row of the checkpoint's "
            f"{arch.vocab_size}-row vocabulary"
        )
    arch.block_size = args.block_size or arch.block_size
    arch.clean_attention = args.clean_attention or arch.clean_attention
    arch.mask_token_id = args.mask_token_id if args.mask_token_id is not None else arch.mask_token_id
    tokenizer_dir = args.tokenizer_dir or os.path.join(args.load, "tokenizer")
    if not os.path.isdir(tokenizer_dir) and saved is not None:
        tokenizer_dir = getattr(saved, "tokenizer_model", None) or ""
    if args.tokenizer_dir and not os.path.isdir(args.tokenizer_dir):
        raise SystemExit(f"error: --tokenizer-dir {args.tokenizer_dir} is not a folder")
    try:
        special = hf_export.special_token_ids(tokenizer_dir)
        config_json = hf_export.hf_config(arch, args.format, "bfloat16", special)  # dtype: set below
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
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
    # Each parameter keeps its stored dtype unless --dtype names one; torch_dtype names the dtype
    # most weight elements end up in (HF casts the rest to it on load unless told otherwise).
    try:
        stored = stored_dtypes(ckpt)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    kept = {param: stored.get(chunks[0].key, chunks[0].dtype) for param, chunks in by_param.items()}
    dtypes = {param: getattr(torch, DTYPES[args.dtype]) for param in kept} if args.dtype else kept
    elements: dict[str, int] = {}
    for param, dt in dtypes.items():
        name = str(dt).removeprefix("torch.")
        elements[name] = elements.get(name, 0) + torch.Size(shapes[param]).numel()
    config_json["torch_dtype"] = max(elements, key=elements.get)
    if len(elements) > 1:
        mix = ", ".join(f"{n} elements in {d}" for d, n in elements.items())
        print(
            f"notice: the parameters are stored in several dtypes ({mix}) and are written so; "
            f"torch_dtype names the most common, {config_json['torch_dtype']} (--dtype casts all to one)"
        )

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

    total = sum(torch.Size(shapes[p]).numel() * dt.itemsize for p, dt in dtypes.items())
    progress = Progress("convert_mcore_to_hf", len(by_param), total)

    def write(tmp: str) -> None:
        nonlocal shard_bytes
        for param, chunks in by_param.items():
            loaded = read_parameter(ckpt, chunks, shapes[param], kept[param])
            if param in ("embedding.word_embeddings.weight", "output_layer.weight"):
                loaded = loaded[: arch.vocab_size]
            for name, tensor in hf_params_from_mcore(param, loaded, shape).items():
                shard[name] = tensor.to(dtypes[param]).contiguous()
                shard_bytes += tensor.numel() * tensor.element_size()
            if shard_bytes >= args.max_shard_size_mb * 2**20:
                flush(tmp)
            progress.step(torch.Size(shapes[param]).numel() * dtypes[param].itemsize)
        flush(tmp)
        if len(files) > 1:
            size = sum(os.path.getsize(os.path.join(tmp, f)) for f in files)
            index = {"metadata": {"total_size": size}, "weight_map": weight_map}
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        else:
            os.replace(os.path.join(tmp, files[0]), os.path.join(tmp, "model.safetensors"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config_json, f, indent=2)
        if os.path.isdir(tokenizer_dir):
            for name in os.listdir(tokenizer_dir):
                shutil.copy2(os.path.join(tokenizer_dir, name), os.path.join(tmp, name))
        else:
            print(
                f"notice: no tokenizer found (looked in {tokenizer_dir or args.load}); pass --tokenizer-dir"
            )
        hf_export.write_generation_config(tmp, config_json, args.format)
        if args.format == "sdar":
            hf_export.write_remote_code(tmp, moe=bool(arch.num_experts))
            try:
                token, why_not = hf_export.set_mask_token(tmp, arch.mask_token_id)
            except ValueError as err:
                raise SystemExit(f"error: {err}") from None
            if token is not None:
                print(f"tokenizer mask token: {token!r} (id {arch.mask_token_id})")
            else:
                print(f"notice: {why_not}")

    try:
        with atomic_directory(args.save, overwrite=args.overwrite) as tmp:
            write(tmp)
    except (OSError, ValueError) as err:  # also FileExistsError: another process writes --save
        raise SystemExit(f"error: {err}") from None
    progress.done()
    print(f"wrote {args.save} ({len(weight_map)} tensors, {args.format}, {config_json['torch_dtype']})")
    return {"path": args.save, "config": config_json}


if __name__ == "__main__":
    main()
