#!/usr/bin/env python3
"""Convert a HF Llama/Qwen3/Qwen3-MoE checkpoint into a Megatron ``torch_dist`` checkpoint.

    python tools/convert_hf_to_mcore.py --hf-dir /models/Qwen3-1.7B --save ckpt/qwen3-1.7b \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 1 --mask-token '<|MASK|>'

The checkpoint (``--save/release`` + ``latest_checkpointed_iteration.txt``) is Megatron's sharded
format, which Megatron reshards on load, so it starts ``pretrain_sdar.py --finetune --load`` at any
tensor/pipeline layout whose divisibility rules it meets; the parallel sizes given here are checked
and fix the vocabulary padding (``--make-vocab-size-divisible-by`` x TP). Weights are read and
written one parameter at a time (peak memory about one parameter; the RSS also counts the pages of
the memory-mapped safetensors files read so far, which the kernel can drop: see
benchmarks/conversion_memory.py). Also written: ``sdar_architecture.json`` (the architecture, the
Megatron flags it implies and the weights' dtype) and the tokenizer files under ``tokenizer/``.

The ``--save`` folder is written as a whole under a temporary sibling name
(``<save>.tmp-<host>-<pid>``) and renamed into place when complete, so a failed conversion leaves
nothing; what a killed one left is removed by the next conversion to the same folder, which says
so, and a conversion still running there is not disturbed: the second one is refused. A long
conversion reports its progress (parameters, GB, rate, time left) on stderr every few seconds.

Released SDAR folders (``SDARForCausalLM`` / ``SDARMoeForCausalLM``, e.g. SDAR-4B-Chat or
SDAR-30B-A3B-Chat) convert as they are: their ``block_size`` and ``mask_token_id`` are recorded.
The weights keep the source's dtype unless ``--dtype`` says otherwise: the config's ``dtype`` /
``torch_dtype``, or, when the config names none, the one dtype its tensors are stored in.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
from argparse import Namespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sdar import compat  # noqa: E402

compat.ignore_known_warnings()  # the megatron-core / torch notices named there, nothing else

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "chat_template.jinja", "generation_config.json",
)  # fmt: skip
from megatron_sdar.conversion.hf import DTYPES, SAFETENSORS_FLOATS  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--save", required=True)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--expert-model-parallel-size", type=int, default=1)
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    p.add_argument(
        "--mask-token",
        default=None,
        help="mask token: a token string (added to the tokenizer if missing) or an id (an unused "
        "row, or the row count to add a row). Default: the config's mask_token_id (SDAR checkpoints "
        "have one). When the config has one, a string must name that very token; an id that differs "
        "replaces it, with a notice",
    )
    p.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="SDAR block size to record (default: the config's block_size; a different value "
        "replaces it, with a notice)",
    )
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="dtype of the written weights (default: the source's: the config's dtype/torch_dtype, "
        "else the dtype its tensors are stored in)",
    )
    p.add_argument("--overwrite", action="store_true")
    return p


def resolve_mask_token(hf_dir: str, value: str | None, vocab_size: int) -> tuple[int | None, object | None]:
    """The mask token's id, and the tokenizer to save when the token had to be added to it.

    A token string the tokenizer lacks is added as a special token; it takes the next id, which is
    either a spare embedding row (Qwen3 has 267) or one new row. An id equal to the number of rows
    also asks for a new row (weights-only folders).
    """
    if value is None:
        return None, None
    added = None
    if value.lstrip("-").isdigit():
        token_id = int(value)
    else:
        from transformers import AutoTokenizer

        from megatron_sdar.data.tokenizer import VOCABULARY_FILES, has_tokenizer_files

        ask_for_id = f"pass an id instead: an unused row below {vocab_size}, or {vocab_size} to add a row"
        if not has_tokenizer_files(hf_dir):
            # transformers would make an empty tokenizer from config.json alone and give the
            # string the first free id, which is a trained row
            raise SystemExit(
                f"error: --mask-token {value!r} is a string but {hf_dir} has no tokenizer (none of "
                f"{', '.join(VOCABULARY_FILES)}); {ask_for_id}"
            )
        try:
            # SDAR folders name remote code in config.json (auto_map); the tokenizer needs none, and
            # without trust_remote_code=False transformers would stop to ask whether to run it.
            tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True, trust_remote_code=False)
        except Exception as err:
            raise SystemExit(
                f"error: --mask-token {value!r} is a string but {hf_dir} has no tokenizer ({err}); "
                f"{ask_for_id}"
            ) from None
        if len(tok) <= len(set(tok.all_special_ids)):
            raise SystemExit(
                f"error: --mask-token {value!r} is a string but the tokenizer in {hf_dir} is empty (no "
                f"tokens beyond its special ones); {ask_for_id}"
            )
        token_id = tok.convert_tokens_to_ids(value)
        if token_id is None or token_id == tok.unk_token_id:
            tok.add_tokens([value], special_tokens=True)
            token_id = tok.convert_tokens_to_ids(value)
            added = tok
    if not 0 <= token_id <= vocab_size:
        raise SystemExit(
            f"error: mask token id {token_id} is outside the embedding's {vocab_size} rows (use an unused "
            f"row below {vocab_size}, or {vocab_size} to add one)"
        )
    return token_id, added


def choose_sdar_fields(arch, args, hf_rows: int) -> tuple[object | None, list[str]]:
    """Settle the mask token id and block size from the config (already in ``arch``) and the flags;
    returns the tokenizer to save if the mask token was added to it, and lines to print.

    The config's values are the ones an SDAR model was trained with, so a ``--mask-token`` string
    naming another token is refused (it would train a different row as the mask); an explicit id or
    ``--block-size`` that differs is taken as meant and replaces the config's value, with a notice.
    """
    lines = []
    sources = {"mask token id": "config.json", "block size": "config.json"}
    configured_mask = arch.mask_token_id
    added = None
    if args.mask_token:
        token_id, added = resolve_mask_token(args.hf_dir, args.mask_token, hf_rows)
        if configured_mask is not None and token_id != configured_mask:
            if not args.mask_token.lstrip("-").isdigit():
                named = "not in the tokenizer" if added is not None else f"token id {token_id}"
                raise SystemExit(
                    f"error: --mask-token {args.mask_token!r} is {named}, but config.json's mask_token_id is "
                    f"{configured_mask}, the row this model was trained to unmask; leave out --mask-token to "
                    f"keep it, or pass an id to replace it deliberately"
                )
            lines.append(
                f"notice: --mask-token {token_id} replaces config.json's mask_token_id {configured_mask}"
            )
        arch.mask_token_id = token_id
        sources["mask token id"] = "--mask-token"
    if args.block_size is not None:  # positive (check_sizes)
        if arch.block_size is not None and args.block_size != arch.block_size:
            lines.append(
                f"notice: --block-size {args.block_size} replaces config.json's block_size {arch.block_size}"
            )
        arch.block_size = args.block_size
        sources["block size"] = "--block-size"
    values = {"mask token id": arch.mask_token_id, "block size": arch.block_size}
    lines.append(
        "SDAR fields: "
        + ", ".join(
            f"{k} {v} (from {sources[k]})" if v is not None else f"{k} not set" for k, v in values.items()
        )
    )
    return added, lines


def check_sizes(args) -> None:
    """Refuse parallel sizes and a vocabulary divisor below 1 (they divide the vocabulary)."""
    for flag in (
        "--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--expert-model-parallel-size",
        "--make-vocab-size-divisible-by",
    ):  # fmt: skip
        value = getattr(args, flag[2:].replace("-", "_"))
        if value < 1:
            raise SystemExit(f"error: {flag} must be a positive integer, not {value}")
    if args.block_size is not None and args.block_size < 1:
        raise SystemExit(f"error: --block-size must be positive, not {args.block_size}")


def check_layout(arch, args) -> None:
    tp, pp, ep = (
        args.tensor_model_parallel_size,
        args.pipeline_model_parallel_size,
        args.expert_model_parallel_size,
    )
    problems = []
    if arch.num_attention_heads % tp or arch.num_query_groups % tp:
        problems.append(
            f"{arch.num_attention_heads} heads / {arch.num_query_groups} KV groups do not split over TP={tp}"
        )
    if arch.ffn_hidden_size % tp:
        problems.append(f"FFN size {arch.ffn_hidden_size} does not split over TP={tp}")
    if arch.num_layers % pp:
        problems.append(
            f"{arch.num_layers} layers do not split over PP={pp} (use uneven-stage flags in training)"
        )
    if ep != 1 and not arch.num_experts:
        problems.append("expert parallelism needs a mixture-of-experts model; this one is dense")
    if arch.num_experts and arch.num_experts % ep:
        problems.append(f"{arch.num_experts} experts do not split over EP={ep}")
    if arch.num_experts and arch.moe_ffn_hidden_size % tp:
        problems.append(f"expert FFN size {arch.moe_ffn_hidden_size} does not split over TP={tp}")
    if problems:
        raise SystemExit("error: " + "; ".join(problems))


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    check_sizes(args)
    import torch

    from megatron_sdar.atomic import atomic_directory, refuse_to_replace, remove_stale_temporaries
    from megatron_sdar.conversion.architecture import padded_vocab
    from megatron_sdar.conversion.hf import SafetensorsReader, default_dtype, read_architecture, read_config
    from megatron_sdar.conversion.mapping import AttentionShape, mcore_names_for_hf, mcore_param_from_hf
    from megatron_sdar.conversion.megatron import ARCHITECTURE_FILE, meta_model
    from megatron_sdar.conversion.torch_dist import Progress, checkpoint_layout, save_torch_dist

    try:
        if os.path.isdir(args.save):  # what earlier versions left inside --save when interrupted
            remove_stale_temporaries(os.path.join(args.save, "release"))
        refuse_to_replace(args.save, args.overwrite)
        arch = read_architecture(
            args.hf_dir, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size
        )
        reader = SafetensorsReader(args.hf_dir)
        stored = reader.stored_dtypes()
        if args.dtype is None:
            dtype_name, dtype_source = default_dtype(read_config(args.hf_dir), stored)
        else:
            dtype_name, dtype_source = DTYPES[args.dtype], "--dtype"
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    check_layout(arch, args)
    hf_rows = arch.vocab_size
    added_tokenizer, lines = choose_sdar_fields(arch, args, hf_rows)
    if arch.mask_token_id == hf_rows:  # a new embedding row for the mask token
        arch.vocab_size = hf_rows + 1
        arch.padded_vocab_size = padded_vocab(
            arch.vocab_size, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size
        )
    print("\n".join(lines))
    cast = sorted(k for k in stored if k != dtype_name and k in SAFETENSORS_FLOATS.values())
    note = f"; the tensors stored in {', '.join(cast)} are cast to it" if cast else ""
    print(f"dtype: {dtype_name} (from {dtype_source}){note}")
    shape = AttentionShape(arch.num_attention_heads, arch.num_query_groups, arch.kv_channels)
    try:
        wanted = set(
            mcore_names_for_hf(reader.names(), arch.num_layers, arch.tied_embeddings, arch.num_experts)
        )
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None

    meta = meta_model(arch)
    layout = checkpoint_layout(meta)
    params = {c.param for c in layout.chunks}
    if params != wanted:
        raise SystemExit(
            f"error: the HF checkpoint and the Megatron model disagree: missing in HF "
            f"{sorted(params - wanted)[:5]}, unused HF {sorted(wanted - params)[:5]}"
        )
    expected = {n: tuple(p.shape) for n, p in meta.named_parameters()}
    dtype = getattr(torch, dtype_name)
    total = sum(torch.Size(expected[n]).numel() for n in params) * dtype.itemsize
    progress = Progress("convert_hf_to_mcore", len(params), total)

    def fetch(name: str) -> torch.Tensor:
        try:
            tensor = mcore_param_from_hf(name, reader, shape)
        except RuntimeError as err:  # a HF tensor of the wrong size for the config
            raise SystemExit(f"error: {name}: cannot build it from the HF tensors ({err})") from None
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            if arch.vocab_size > tensor.shape[0]:  # the added mask token: start from the mean row
                tensor = torch.cat([tensor, tensor.float().mean(0, keepdim=True).to(tensor.dtype)])
            pad = arch.padded_vocab_size - tensor.shape[0]
            tensor = torch.cat([tensor, tensor.new_zeros(pad, tensor.shape[1])]) if pad else tensor
        if tuple(tensor.shape) != expected[name]:
            raise SystemExit(
                f"error: {name}: HF gives shape {tuple(tensor.shape)}, expected {expected[name]}"
            )
        progress.step(tensor.numel() * dtype.itemsize)
        return tensor

    common = {
        "iteration": 0,
        "checkpoint_version": 3.0,
        "args": Namespace(
            num_layers=arch.num_layers,
            hidden_size=arch.hidden_size,
            num_attention_heads=arch.num_attention_heads,
            add_position_embedding=False,
            padded_vocab_size=arch.padded_vocab_size,
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        ),  # fmt: skip
    }
    # The whole folder (checkpoint, tracker, architecture, tokenizer) is written under a temporary
    # name and renamed into place: a failed or interrupted conversion leaves no --save folder.
    try:
        with atomic_directory(args.save, overwrite=args.overwrite) as tmp:
            save_torch_dist(tmp, layout, fetch, common, dtype=dtype, overwrite=True)
            with open(os.path.join(tmp, ARCHITECTURE_FILE), "w") as f:
                json.dump({**arch.to_json(), "dtype": dtype_name, "dtype_source": dtype_source}, f, indent=2)
            copied = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(args.hf_dir, n))]
            if added_tokenizer is not None:
                added_tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
                copied = [n for n in copied if n == "generation_config.json"]
            if copied:
                os.makedirs(os.path.join(tmp, "tokenizer"), exist_ok=True)
                for name in copied:
                    shutil.copy2(os.path.join(args.hf_dir, name), os.path.join(tmp, "tokenizer", name))
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    progress.done()
    path = os.path.join(args.save, "release")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"wrote {path} ({len(layout.chunks)} tensor chunks, {dtype_name}); peak RSS {peak_mb:.0f} MB")
    print("architecture flags: " + " ".join(arch.megatron_args()))
    return {"path": path, "architecture": arch, "peak_rss_mb": peak_mb, "dtype": dtype_name}


if __name__ == "__main__":
    main()
