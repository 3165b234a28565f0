#!/usr/bin/env python3
"""Tokenise text or JSONL into Megatron indexed datasets (``.bin``/``.idx``) for SDAR CPT.

    python tools/preprocess_data.py --input corpus.jsonl --json-keys text \\
        --tokenizer /path/to/hf_tokenizer_dir --output-prefix data/corpus --workers 8

Megatron-LM's ``tools/preprocess_data.py`` spelling works too and writes the same bytes:

    python tools/preprocess_data.py --input corpus.jsonl --json-keys text \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model /path/to/hf_tokenizer_dir \\
        --append-eod --output-prefix data/corpus --workers 8
    python tools/preprocess_data.py --input corpus.jsonl --tokenizer-type SentencePieceTokenizer \\
        --tokenizer-model tokenizer.model --append-eod --output-prefix data/corpus --workers 8

Only local tokenizers are read (a HF tokenizer directory or a SentencePiece model file); nothing is
downloaded. With that spelling ``--append-eod`` is required, as SDAR needs it (below).

Each JSONL line is one document; plain text files are split into documents by blank lines
(``--text-unit paragraph``, default), one per line (``line``) or one per file (``file``). The
end-of-document token is appended to every document (it is what the SDAR masks use to find document
boundaries inside a packed window). Output: ``{prefix}_{key}_document.bin/.idx`` per JSON key
(``{prefix}_text_document`` for text input), written under temporary names and renamed when
complete, so an interrupted run never leaves a dataset that looks valid.

Lines that cannot be used (invalid JSON, missing key, value not a string, empty text) are reported
with their file and line number and skipped; ``--strict`` turns the first one into an error.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sdar import compat  # noqa: E402

compat.ignore_known_warnings()  # the megatron-core / torch notices named there, nothing else

_TOKENIZER = None


@dataclass
class Record:
    """One input document (or the reason it cannot be used)."""

    source: str
    line: int
    texts: dict[str, str] = field(default_factory=dict)
    error: str | None = None


def read_records(path: str, fmt: str, keys: list[str], text_unit: str) -> Iterator[Record]:
    """Yield documents from one input file with their 1-based starting line numbers."""
    with open(path, encoding="utf-8", errors="strict") as f:
        if fmt == "jsonl":
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                yield _json_record(path, lineno, line, keys)
            return
        if text_unit == "file":
            yield _text_record(path, 1, f.read(), keys)
            return
        if text_unit == "line":
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield _text_record(path, lineno, line.rstrip("\n"), keys)
            return
        para: list[str] = []
        start = 1
        for lineno, line in enumerate(f, 1):
            if line.strip():
                if not para:
                    start = lineno
                para.append(line.rstrip("\n"))
            elif para:
                yield _text_record(path, start, "\n".join(para), keys)
                para = []
        if para:
            yield _text_record(path, start, "\n".join(para), keys)


def _text_record(path: str, lineno: int, text: str, keys: list[str]) -> Record:
    return Record(path, lineno, {keys[0]: text})


def _json_record(path: str, lineno: int, line: str, keys: list[str]) -> Record:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        return Record(path, lineno, error=f"invalid JSON ({err.msg} at column {err.colno})")
    if not isinstance(obj, dict):
        return Record(path, lineno, error=f"expected a JSON object, got {type(obj).__name__}")
    texts = {}
    for key in keys:
        if key not in obj:
            return Record(path, lineno, error=f"missing key {key!r}")
        if not isinstance(obj[key], str):
            return Record(path, lineno, error=f"key {key!r} is {type(obj[key]).__name__}, not a string")
        texts[key] = obj[key]
    return Record(path, lineno, texts)


def _init_worker(tokenizer_path: str, eod_token: str | None, kind: str | None) -> None:
    global _TOKENIZER
    from megatron_sdar.data.tokenizer import load_tokenizer

    _TOKENIZER = load_tokenizer(tokenizer_path, eod_token, kind)


def _encode(args: tuple[Record, bool]) -> tuple[Record, dict[str, list[int]]]:
    record, append_eod = args
    if record.error is not None:
        return record, {}
    out = {}
    for key, text in record.texts.items():
        if not text.strip():
            record.error = f"empty text under {key!r}"
            return record, {}
        ids = _TOKENIZER.encode(text)
        if append_eod:
            ids.append(_TOKENIZER.eod_id)
        out[key] = ids
    return record, out


def output_prefix(prefix: str, key: str) -> str:
    return f"{prefix}_{key}_document"


# Megatron-LM's --tokenizer-type values this tool reads, and the local tokenizer each one names
TOKENIZER_TYPES = {"HuggingFaceTokenizer": "hf", "SentencePieceTokenizer": "sentencepiece"}
SUPPORTED_TYPES = (
    "HuggingFaceTokenizer (--tokenizer-model: a local HF tokenizer directory) and "
    "SentencePieceTokenizer (--tokenizer-model: a SentencePiece .model file)"
)
WHY_EOD = (
    "SDAR's document masks find where documents end inside a packed training window by the "
    "end-of-document token, so every document must end with it"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="text or JSONL files")
    p.add_argument("--input-format", choices=["auto", "jsonl", "text"], default="auto")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="JSONL keys to tokenise")
    p.add_argument("--text-unit", choices=["paragraph", "line", "file"], default="paragraph")
    tok = p.add_argument_group(
        "tokenizer", "--tokenizer PATH, or Megatron-LM's --tokenizer-type TYPE --tokenizer-model PATH"
    )
    tok.add_argument("--tokenizer", help="local HF tokenizer dir or SentencePiece .model")
    tok.add_argument("--tokenizer-type", help=f"Megatron-LM spelling; supported: {SUPPORTED_TYPES}")
    tok.add_argument("--tokenizer-model", help="Megatron-LM spelling of --tokenizer (local files only)")
    tok.add_argument("--eod-token", default=None, help="end-of-document token (default: the eos token)")
    for flag in ("--vocab-file", "--merge-file"):  # Megatron-LM's GPT2BPE/BERT vocabularies: refused
        tok.add_argument(flag, help=argparse.SUPPRESS)
    eod = p.add_mutually_exclusive_group()
    eod.add_argument(
        "--append-eod", dest="append_eod", action="store_const", const=True, default=None,
        help="append the end-of-document token to every document: the default with --tokenizer, "
        f"required with --tokenizer-type/--tokenizer-model ({WHY_EOD}; Megatron-LM leaves it out "
        "unless asked)",
    )  # fmt: skip
    eod.add_argument(
        "--no-append-eod", dest="append_eod", action="store_const", const=False,
        help="do not append it; only for text in which every document already ends with the "
        "end-of-document token (SDAR training needs it there)",
    )  # fmt: skip
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument(
        "--partitions", type=int, default=1,
        help="accepted for Megatron-LM commands and not needed: one pass with --workers processes "
        "writes the single dataset Megatron-LM merges its partitions into",
    )  # fmt: skip
    p.add_argument("--log-interval", type=int, default=None, help="progress every N documents (default: 2 s)")
    p.add_argument("--strict", action="store_true", help="fail on the first unusable line")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def resolve_tokenizer(args: argparse.Namespace) -> tuple[str, str | None, bool]:
    """``(path, kind, append_eod)`` from either spelling of the tokenizer options.

    ``kind`` is ``"hf"``/``"sentencepiece"`` when ``--tokenizer-type`` names it, else ``None`` (told
    by the path). Every combination that could mean something else is refused here, before any
    output exists.
    """
    kind = None
    if args.tokenizer_type is not None:
        kind = TOKENIZER_TYPES.get(args.tokenizer_type)
        if kind is None:
            raise SystemExit(
                f"error: --tokenizer-type {args.tokenizer_type} is not supported; this tool reads "
                f"{SUPPORTED_TYPES}"
            )
    for flag, value in (("--vocab-file", args.vocab_file), ("--merge-file", args.merge_file)):
        if value is not None:
            raise SystemExit(
                f"error: {flag} is not used: the tokenizers this tool reads ({SUPPORTED_TYPES}) carry "
                "their own vocabulary; drop it"
            )
    if args.tokenizer and args.tokenizer_model and not _same_path(args.tokenizer, args.tokenizer_model):
        raise SystemExit(
            f"error: --tokenizer {args.tokenizer} and --tokenizer-model {args.tokenizer_model} name "
            "different tokenizers; pass one of them"
        )
    flag, path = (
        ("--tokenizer-model", args.tokenizer_model)
        if args.tokenizer_model
        else ("--tokenizer", args.tokenizer)
    )
    if path is None:
        raise SystemExit(
            "error: name the tokenizer with --tokenizer PATH, or with --tokenizer-type "
            "HuggingFaceTokenizer|SentencePieceTokenizer --tokenizer-model PATH"
        )
    if not os.path.exists(path):
        raise SystemExit(
            f"error: {flag} {path} does not exist; pass a local HF tokenizer directory or a "
            "SentencePiece .model file (nothing is downloaded)"
        )
    if kind == "hf" and not os.path.isdir(path):
        raise SystemExit(
            f"error: --tokenizer-type HuggingFaceTokenizer reads a HF tokenizer directory, and {path} is "
            "a file (for a SentencePiece model use --tokenizer-type SentencePieceTokenizer)"
        )
    if kind == "sentencepiece" and os.path.isdir(path):
        raise SystemExit(
            f"error: --tokenizer-type SentencePieceTokenizer reads a SentencePiece model file, and {path} "
            "is a directory (for a HF tokenizer use --tokenizer-type HuggingFaceTokenizer)"
        )
    append_eod = args.append_eod
    if append_eod is None:
        if args.tokenizer_type is not None or args.tokenizer_model is not None:
            raise SystemExit(
                f"error: --append-eod is missing: {WHY_EOD}. Add --append-eod (or --no-append-eod if "
                "the text of every document already ends with that token)"
            )
        append_eod = True
    return path, kind, append_eod


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _format(path: str) -> str:
    return "jsonl" if path.endswith((".jsonl", ".json", ".jsonl.txt")) else "text"


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    from megatron.core.datasets.indexed_dataset import DType

    from megatron_sdar.data.preprocessing import DroppedLines, IndexedOutputs
    from megatron_sdar.data.tokenizer import load_tokenizer

    for path in args.input:
        if not os.path.isfile(path):
            raise SystemExit(f"error: input file {path!r} does not exist")
    if args.workers < 1:
        raise SystemExit("error: --workers must be >= 1")
    if args.partitions < 1 or (args.log_interval is not None and args.log_interval < 1):
        raise SystemExit("error: --partitions and --log-interval must be >= 1")
    tokenizer_path, kind, append_eod = resolve_tokenizer(args)
    try:
        tokenizer = load_tokenizer(tokenizer_path, args.eod_token, kind)
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    keys = args.json_keys
    formats = {p: (args.input_format if args.input_format != "auto" else _format(p)) for p in args.input}
    if any(f == "text" for f in formats.values()) and len(keys) != 1:
        raise SystemExit("error: text input has one field; pass a single --json-keys name (or none)")

    prefixes = {key: output_prefix(args.output_prefix, key) for key in keys}
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    try:
        outputs = IndexedOutputs(prefixes, {key: dtype for key in keys}, args.overwrite)
    except FileExistsError as err:
        raise SystemExit(f"error: {err}") from None

    def records() -> Iterator[tuple[Record, bool]]:
        for path in args.input:
            for record in read_records(path, formats[path], keys, args.text_unit):
                yield record, append_eod

    tokens_per_key: Counter = Counter()
    documents = 0
    dropped = DroppedLines(args.strict)
    start = time.time()
    last_report = start
    pool = None
    with outputs:
        try:
            if args.workers > 1:
                pool = multiprocessing.get_context("spawn").Pool(
                    args.workers, initializer=_init_worker, initargs=(tokenizer_path, args.eod_token, kind)
                )
                results = pool.imap(_encode, records(), chunksize=64)
            else:
                global _TOKENIZER
                _TOKENIZER = tokenizer
                results = map(_encode, records())
            for record, ids in results:
                if record.error is not None:
                    dropped.add(record.source, record.line, record.error)
                    continue
                for key, tokens in ids.items():
                    outputs.add_document(key, tokens)
                    tokens_per_key[key] += len(tokens)
                documents += 1
                now = time.time()
                due = (
                    documents % args.log_interval == 0
                    if args.log_interval is not None
                    else now - last_report > 2.0
                )
                if not args.quiet and due:
                    rate = documents / (now - start)
                    print(f"\r{documents} documents ({rate:.0f}/s)", end="", file=sys.stderr)
                    last_report = now
        finally:
            if pool is not None:
                pool.terminate()

    elapsed = time.time() - start
    summary = {
        "documents": documents,
        "tokens": {key: tokens_per_key[key] for key in keys},
        "dropped": dropped.total,
        "dropped_by_reason": dict(dropped.by_reason),
        "outputs": list(prefixes.values()),
        "seconds": round(elapsed, 2),
    }
    if not args.quiet:
        print("", file=sys.stderr)
    print(f"documents: {summary['documents']}")
    for key in keys:
        print(f"tokens[{key}]: {summary['tokens'][key]}  -> {prefixes[key]}.bin/.idx")
    dropped.print()
    return summary


if __name__ == "__main__":
    main()
