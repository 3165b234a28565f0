#!/usr/bin/env python3
"""Chat JSONL -> packed SFT windows for SDAR (Megatron indexed datasets).

    python tools/preprocess_sft.py --input chat.jsonl --tokenizer /path/to/hf_tokenizer_dir \\
        --output-prefix data/sft --seq-length 4096 --block-size 4

Each line holds ``{"messages": [{"role": ..., "content": ...}, ...]}`` or
``{"prompt": ..., "response": ...}``. Examples are rendered with the tokenizer's chat template;
only assistant tokens are eligible for noising. Each example is right-padded to a multiple of the
block size with the end token (eligible, as in the released recipe; ``--no-train-pad`` to exclude),
then examples are packed into windows of ``--seq-length`` tokens with a greedy knapsack.
Examples longer than a window are dropped and counted (``--truncate`` cuts them instead).
Unusable lines are reported with line numbers and skipped (``--strict``: fail).

Output: ``{prefix}_tokens.bin/.idx`` and ``{prefix}_segments.bin/.idx`` (see
megatron_sdar/data/sft_windows.py), written under temporary names and renamed when complete.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sdar import compat  # noqa: E402

compat.ignore_known_warnings()  # the megatron-core / torch notices named there, nothing else


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="chat JSONL files")
    p.add_argument("--tokenizer", required=True, help="local HF tokenizer directory with a chat template")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--seq-length", type=int, required=True, help="window length L (clean tokens)")
    p.add_argument("--block-size", type=int, required=True, help="SDAR block size B")
    p.add_argument("--pad-token", default=None, help="padding token (default: the tokenizer's eos token)")
    p.add_argument("--no-train-pad", dest="train_pad", action="store_false", help="pad tokens not eligible")
    p.add_argument("--truncate", action="store_true", help="truncate over-long examples instead of dropping")
    p.add_argument("--strict", action="store_true", help="fail on the first unusable line")
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    from megatron.core.datasets.indexed_dataset import DType

    from megatron_sdar.data.preprocessing import DroppedLines, IndexedOutputs
    from megatron_sdar.data.sft import (
        ExampleError,
        TokenizedExample,
        example_messages,
        pack_greedy,
        pad_to_block,
        parse_json_line,
        tokenize_chat,
    )
    from megatron_sdar.data.sft_windows import encode_segments
    from megatron_sdar.data.tokenizer import load_tokenizer

    if args.block_size < 1 or args.seq_length % args.block_size != 0:
        raise SystemExit(
            f"error: --seq-length {args.seq_length} must be a positive multiple of "
            f"--block-size {args.block_size}"
        )
    for path in args.input:
        if not os.path.isfile(path):
            raise SystemExit(f"error: input file {path!r} does not exist")
    tokenizer = load_tokenizer(args.tokenizer)
    if tokenizer.kind != "hf":
        raise SystemExit("error: SFT data needs a HF tokenizer directory with a chat template")
    pad_id = tokenizer.eod_id
    if args.pad_token is not None:
        pad_id = tokenizer.backend.convert_tokens_to_ids(args.pad_token)
        if pad_id is None or pad_id == tokenizer.backend.unk_token_id:
            raise SystemExit(f"error: pad token {args.pad_token!r} is not in the tokenizer")

    prefixes = {kind: f"{args.output_prefix}_{kind}" for kind in ("tokens", "segments")}
    dtypes = {"tokens": DType.optimal_dtype(tokenizer.vocab_size), "segments": np.int32}
    try:
        outputs = IndexedOutputs(prefixes, dtypes, args.overwrite)
    except FileExistsError as err:
        raise SystemExit(f"error: {err}") from None

    too_long: Counter = Counter()
    dropped = DroppedLines(args.strict)
    examples: list[TokenizedExample] = []
    with outputs:
        for path in args.input:
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        example = tokenize_chat(tokenizer, example_messages(parse_json_line(line)))
                    except ExampleError as err:
                        dropped.add(path, lineno, str(err))
                        continue
                    example = pad_to_block(example, args.block_size, pad_id, args.train_pad)
                    if len(example) > args.seq_length:
                        if not args.truncate:
                            too_long["too long (dropped)"] += 1
                            continue
                        too_long["too long (truncated)"] += 1
                        example = TokenizedExample(
                            example.tokens[: args.seq_length], example.eligible[: args.seq_length]
                        )
                        if not any(example.eligible):
                            too_long["too long (no response left after truncation, dropped)"] += 1
                            continue
                    examples.append(example)
        if not examples:
            raise SystemExit("error: no usable examples")
        packs = pack_greedy([len(e) for e in examples], args.seq_length)
        for pack in packs:
            tokens: list[int] = []
            ordinals: list[int] = []
            eligible: list[bool] = []
            for ordinal, idx in enumerate(pack, 1):
                tokens += examples[idx].tokens
                eligible += examples[idx].eligible
                ordinals += [ordinal] * len(examples[idx])
            outputs.add_document("tokens", tokens)
            outputs.add_document("segments", encode_segments(ordinals, eligible))

    total_tokens = sum(len(e) for e in examples)
    summary = {
        "examples": len(examples),
        "windows": len(packs),
        "tokens": total_tokens,
        "response_tokens": sum(sum(e.eligible) for e in examples),
        "fill": round(total_tokens / (len(packs) * args.seq_length), 4),
        "dropped": dropped.total,
        "too_long": dict(too_long),
        "dropped_by_reason": dict(dropped.by_reason),
        "output_prefix": args.output_prefix,
    }
    print(f"examples: {summary['examples']} -> windows: {summary['windows']} of {args.seq_length} tokens")
    print(f"tokens: {total_tokens} ({summary['response_tokens']} trained), fill {summary['fill']:.1%}")
    for reason, count in summary["too_long"].items():
        print(f"{reason}: {count}")
    dropped.print()
    return summary


if __name__ == "__main__":
    main()
