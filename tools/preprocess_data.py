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

Lines that cannot be used (invalid JSON, missing key, value not a string, empty text, bytes that are
not UTF-8) are reported with their file and line number and skipped; ``--strict`` turns the first one
into an error. A JSON array file (``[{...}, {...}]``) is refused: the input is one object per line.
A run that finds no document to write fails, counting why each line was dropped, and writes
nothing. Temporary files that a killed run left for the same output are removed on start (those of
a run still going are left alone), and each is named on stderr. Progress (documents, input bytes,
rate, time left) goes to stderr: every 2 s on a terminal, every 30 s into a log (``--quiet``: none).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sdar import compat  # noqa: E402
from megatron_sdar.data.inputs import TextLines, json_lines, utf8_error  # noqa: E402

compat.ignore_known_warnings()  # the megatron-core / torch notices named there, nothing else

_TOKENIZER = None


@dataclass
class Record:
    """One input document (or the reason it cannot be used); ``end``: input bytes read so far."""

    source: str
    line: int
    texts: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    end: int = 0


def read_records(path: str, fmt: str, keys: list[str], text_unit: str) -> Iterator[Record]:
    """Yield documents from one input file with their 1-based starting line numbers.

    A line that is not UTF-8 is reported at its own number; in text input the whole document that
    holds it (paragraph, line or file) is skipped.
    """
    lines = TextLines(path)
    if fmt == "jsonl":
        for lineno, value, error in json_lines(lines):
            record = Record(path, lineno, error=error) if error else _json_record(path, lineno, value, keys)
            record.end = lines.position
            yield record
        return
    if text_unit == "line":
        for lineno, line, error in lines:
            if error is not None:
                yield Record(path, lineno, error=error, end=lines.position)
            elif line.strip():
                yield Record(path, lineno, {keys[0]: line.rstrip("\n")}, end=lines.position)
        return
    # paragraphs (blank-line separated) or the whole file: one document of several lines
    para: list[str] = []
    start = 1
    bad: tuple[int, str] | None = None
    whole = text_unit == "file"
    for lineno, line, error in lines:
        if error is not None and bad is None:
            bad = (lineno, error)
        if whole or line.strip() or error is not None:
            if not para:
                start = lineno
            para.append(line if whole else line.rstrip("\n"))
        elif para:
            yield _document(path, start, para, bad, text_unit, keys[0], lines.position)
            para, bad = [], None
    if para:
        yield _document(path, start, para, bad, text_unit, keys[0], lines.position)


def _document(
    path: str, start: int, lines: list[str], bad: tuple[int, str] | None, unit: str, key: str, end: int
) -> Record:
    if bad is not None:
        lineno, error = bad
        skipped = "the file, one document," if unit == "file" else f"its paragraph, from line {start},"
        return Record(path, lineno, error=f"{error.removesuffix(')')}; {skipped} is skipped)", end=end)
    return Record(path, start, {key: ("" if unit == "file" else "\n").join(lines)}, end=end)


def _json_record(path: str, lineno: int, obj: object, keys: list[str]) -> Record:
    if not isinstance(obj, dict):
        return Record(path, lineno, error=f"expected a JSON object, got {type(obj).__name__}")
    texts = {}
    for key in keys:
        if key not in obj:
            seen = ", ".join(map(repr, list(obj)[:8])) + (", ..." if len(obj) > 8 else "")
            return Record(path, lineno, error=f"missing key {key!r} (keys seen: {seen or 'none'})")
        if not isinstance(obj[key], str):
            return Record(path, lineno, error=f"key {key!r} is {type(obj[key]).__name__}, not a string")
        error = utf8_error(obj[key], unit="character")
        if error is not None:
            reason, _, detail = error.partition(" (")
            return Record(path, lineno, error=f"{reason} under {key!r} ({detail}")
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
    record.texts = {}  # not sent back from a worker process: the tokens are what is needed
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
    p.add_argument(
        "--log-interval", type=int, default=None,
        help="progress every N documents (default: every 2 s on a terminal, 30 s into a log)",
    )  # fmt: skip
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
    from megatron_sdar.data.progress import Progress
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

    for note in outputs.leftovers:
        print(note, file=sys.stderr)
    read = InputCounts()

    def records() -> Iterator[tuple[Record, bool]]:
        for path in args.input:
            found = False
            for record in read_records(path, formats[path], keys, args.text_unit):
                found = True
                record.end += read.finished_bytes
                yield record, append_eod
            read.finished_bytes += os.path.getsize(path)
            if not found:
                read.empty.append(path)

    tokens_per_key: Counter = Counter()
    documents = 0
    dropped = DroppedLines(args.strict)
    total_bytes = sum(os.path.getsize(p) for p in args.input)
    progress = Progress("documents", total_bytes=total_bytes, enabled=not args.quiet, every=args.log_interval)
    start = time.time()
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
            done = 0
            for record, ids in results:
                done = record.end
                if record.error is not None:
                    dropped.add(record.source, record.line, record.error)
                else:
                    for key, tokens in ids.items():
                        outputs.add_document(key, tokens)
                        tokens_per_key[key] += len(tokens)
                    documents += 1
                progress.update(documents, done)
            progress.finish(documents, done)
        finally:
            if pool is not None:
                pool.terminate()
        if documents == 0:
            raise SystemExit(_no_documents(prefixes, dropped, read.empty))

    elapsed = time.time() - start
    summary = {
        "documents": documents,
        "tokens": {key: tokens_per_key[key] for key in keys},
        "dropped": dropped.total,
        "dropped_by_reason": dict(dropped.by_reason),
        "outputs": list(prefixes.values()),
        "seconds": round(elapsed, 2),
    }
    print(f"documents: {summary['documents']}")
    for key in keys:
        print(f"tokens[{key}]: {summary['tokens'][key]}  -> {prefixes[key]}.bin/.idx")
    dropped.print()
    return summary


@dataclass
class InputCounts:
    """Bytes of the input files read to the end, and the files that held no document at all."""

    finished_bytes: int = 0
    empty: list[str] = field(default_factory=list)


def _no_documents(prefixes: dict[str, str], dropped, empty: list[str]) -> str:
    """The error for a run that found nothing to write, with every reason counted."""
    outputs = ", ".join(f"{p}.bin/.idx" for p in prefixes.values())
    lines = [f"error: no documents to write; nothing was written ({outputs})"]
    if empty:
        lines.append(f"  empty (or only blank lines): {', '.join(empty)}")
    if dropped.total:
        lines.append("every line of the input was dropped:")
        lines.append(dropped.explain())
    return "\n".join(lines)


if __name__ == "__main__":
    main()
