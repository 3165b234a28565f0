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
Unusable lines (invalid JSON or UTF-8, missing fields, a chat the template cannot render, a chat
that starts with the assistant's turn) are reported with file and line number and skipped;
``--strict`` turns the first one into an error. A run with no usable example fails and says why.

Memory does not grow with the number of tokens, only by a few bytes per example: tokenised
examples go to a scratch file beside the output (5 bytes a token, removed at the end) while the
input is read, and each window reads its examples back from there. Temporary files that a killed
run left for the same output are removed on start (those of a run still going are left alone) and
named on stderr. Progress (examples, input bytes, rate, time left) goes to stderr unless ``--quiet``.

Output: ``{prefix}_tokens.bin/.idx`` and ``{prefix}_segments.bin/.idx`` (see
megatron_sdar/data/sft_windows.py), written under temporary names and renamed when complete.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from dataclasses import dataclass, field

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
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    from megatron.core.datasets.indexed_dataset import DType

    from megatron_sdar.data.preprocessing import DroppedLines, IndexedOutputs
    from megatron_sdar.data.sft import ExampleSpill, pack_greedy
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
    for note in outputs.leftovers:
        print(note, file=sys.stderr)

    dropped = DroppedLines(args.strict)
    counts = Counts()
    with outputs:
        spill = ExampleSpill(outputs.scratch("tokens"))
        try:
            read_examples(args, tokenizer, pad_id, spill, dropped, counts)
            if not len(spill):
                raise SystemExit(_no_examples(dropped, counts, args.seq_length))
            spill.finish()
            packs = pack_greedy(spill.lengths.tolist(), args.seq_length)
            write_windows(outputs, spill, packs, not args.quiet)
        finally:
            spill.close()

    summary = {
        "examples": len(spill),
        "windows": len(packs),
        "tokens": counts.tokens,
        "response_tokens": counts.response_tokens,
        "fill": round(counts.tokens / (len(packs) * args.seq_length), 4),
        "dropped": dropped.total,
        "too_long": dict(counts.too_long),
        "dropped_by_reason": dict(dropped.by_reason),
        "output_prefix": args.output_prefix,
    }
    print(f"examples: {summary['examples']} -> windows: {summary['windows']} of {args.seq_length} tokens")
    print(f"tokens: {counts.tokens} ({summary['response_tokens']} trained), fill {summary['fill']:.1%}")
    for reason, count in summary["too_long"].items():
        print(f"{reason}: {count}")
    dropped.print()
    return summary


@dataclass
class Counts:
    """What the reading pass counted besides the dropped lines."""

    tokens: int = 0
    response_tokens: int = 0
    too_long: Counter = field(default_factory=Counter)
    longest_dropped: int = 0


def read_examples(args: argparse.Namespace, tokenizer, pad_id: int, spill, dropped, counts: Counts) -> None:
    """First pass: every input line tokenised, padded and fitted to a window, into ``spill``."""
    from megatron_sdar.data.inputs import TextLines, json_lines
    from megatron_sdar.data.progress import Progress
    from megatron_sdar.data.sft import ExampleError, example_messages, pad_to_block, tokenize_chat

    total_bytes = sum(os.path.getsize(p) for p in args.input)
    progress = Progress("examples", total_bytes=total_bytes, enabled=not args.quiet)
    finished_bytes = 0
    for path in args.input:
        lines = TextLines(path)
        for lineno, row, error in json_lines(lines):
            try:
                if error is not None:
                    raise ExampleError(error)
                example = tokenize_chat(tokenizer, example_messages(row))
            except ExampleError as err:
                dropped.add(path, lineno, str(err))
                example = None
            if example is not None:
                example = pad_to_block(example, args.block_size, pad_id, args.train_pad)
                kept = _fit(example.tokens, example.eligible, args, counts.too_long)
                if kept is None:
                    counts.longest_dropped = max(counts.longest_dropped, len(example))
                else:
                    spill.append(*kept)
                    counts.tokens += len(kept[0])
                    counts.response_tokens += sum(kept[1])
            progress.update(len(spill), finished_bytes + lines.position)
        finished_bytes += lines.size
    progress.finish(len(spill), finished_bytes)


def write_windows(outputs, spill, packs: list[list[int]], show_progress: bool) -> None:
    """Second pass: each window's examples read back from ``spill`` and written together."""
    from megatron_sdar.data.progress import Progress
    from megatron_sdar.data.sft_windows import encode_segments

    progress = Progress("windows", total=len(packs), enabled=show_progress)
    for written, pack in enumerate(packs, 1):
        parts = [spill[i] for i in pack]
        outputs.add_document("tokens", np.concatenate([tokens for tokens, _ in parts]))
        ordinals = np.repeat(np.arange(1, len(parts) + 1), [len(tokens) for tokens, _ in parts])
        eligible = np.concatenate([eligible for _, eligible in parts])
        outputs.add_document("segments", encode_segments(ordinals, eligible))
        progress.update(written)
    progress.finish(len(packs))


def _fit(tokens: list[int], eligible: list[bool], args: argparse.Namespace, too_long: Counter):
    """``(tokens, eligible)`` as they go into a window, or None when the example is too long."""
    if len(tokens) <= args.seq_length:
        return tokens, eligible
    if not args.truncate:
        too_long["too long (dropped)"] += 1
        return None
    too_long["too long (truncated)"] += 1
    tokens, eligible = tokens[: args.seq_length], eligible[: args.seq_length]
    if not any(eligible):
        too_long["too long (no response left after truncation, dropped)"] += 1
        return None
    return tokens, eligible


def _no_examples(dropped, counts: Counts, seq_length: int) -> str:
    """The error when nothing is left to pack: every reason, counted."""
    too_long, longest = counts.too_long, counts.longest_dropped
    if not dropped.total and not too_long:
        return "error: no usable examples: the input holds no non-blank lines"
    lines = ["error: no usable examples; every line was dropped:"]
    if dropped.total:
        lines.append(dropped.explain())
    for reason, count in too_long.items():
        lines.append(f"  {count} example{'s' if count != 1 else ''}: {reason}")
    if longest:
        lines.append(
            f"the longest dropped example has {longest} tokens and --seq-length is {seq_length}: "
            "raise --seq-length or pass --truncate"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
