"""tools/preprocess_data.py: round trips through Megatron's IndexedDataset, bad lines, safety."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from megatron_sdar.data.tokenizer import load_tokenizer
from tools import preprocess_data


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> str:
    import pydoc_data.topics as topics

    import sentencepiece as spm

    out = tmp_path_factory.mktemp("sp") / "sp"
    text = "\n".join(list(topics.topics.values())[:40]).splitlines()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_prefix=str(out), vocab_size=400, model_type="bpe",
        eos_id=2, pad_id=3, minloglevel=2,
    )  # fmt: skip
    return str(out) + ".model"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>", "<pad>"])
    tok.train_from_iterator(["hello world", "the quick brown fox", "documents and more text"] * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    out = tmp_path_factory.mktemp("hf")
    fast.save_pretrained(out)
    return str(out)


def read_docs(prefix: str) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_jsonl_round_trip_and_bad_lines(tmp_path, sp_model):
    src = tmp_path / "in.jsonl"
    write_jsonl(
        src,
        [
            {"text": "The first document."},
            "{not json",
            {"other": "no text key"},
            {"text": ""},
            {"text": 7},
            [1, 2],
            {"text": "A second, longer document about lists and tuples."},
        ],
    )
    summary = preprocess_data.main(
        ["--input", str(src), "--tokenizer", sp_model, "--output-prefix", str(tmp_path / "o"), "--quiet"]
    )
    tok = load_tokenizer(sp_model)
    expected = [
        tok.encode(t) + [tok.eod_id]
        for t in ["The first document.", "A second, longer document about lists and tuples."]
    ]
    assert read_docs(str(tmp_path / "o_text_document")) == expected
    assert summary["documents"] == 2 and summary["dropped"] == 5
    assert summary["tokens"]["text"] == sum(map(len, expected))
    reasons = summary["dropped_by_reason"]
    assert reasons["invalid JSON"] == 1 and reasons["missing key 'text'"] == 1
    assert reasons["empty text under 'text'"] == 1
    assert (
        reasons["key 'text' is int, not a string"] == 1 and reasons["expected a JSON object, got list"] == 1
    )


def test_strict_fails_with_line_number_and_leaves_nothing(tmp_path, sp_model, capsys):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, [{"text": "fine"}, "{broken"])
    prefix = tmp_path / "o"
    with pytest.raises(SystemExit, match=r"in.jsonl:2: invalid JSON"):
        preprocess_data.main(
            [
                "--input",
                str(src),
                "--tokenizer",
                sp_model,
                "--output-prefix",
                str(prefix),
                "--strict",
                "--quiet",
            ]
        )
    assert list(tmp_path.glob("o*")) == []


def test_refuses_to_overwrite(tmp_path, sp_model):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, [{"text": "fine"}])
    args = ["--input", str(src), "--tokenizer", sp_model, "--output-prefix", str(tmp_path / "o"), "--quiet"]
    preprocess_data.main(args)
    with pytest.raises(SystemExit, match="--overwrite"):
        preprocess_data.main(args)
    preprocess_data.main(args + ["--overwrite"])


def test_text_paragraphs_workers_and_hf_tokenizer(tmp_path, hf_dir):
    src = tmp_path / "in.txt"
    src.write_text("hello world\nthe quick fox\n\n\nbrown documents\n\nmore text\n")
    tok = load_tokenizer(hf_dir)
    expected = [
        tok.encode(t) + [tok.eod_id] for t in ["hello world\nthe quick fox", "brown documents", "more text"]
    ]
    for workers in ("1", "2"):
        prefix = tmp_path / f"w{workers}"
        preprocess_data.main(
            [
                "--input",
                str(src),
                "--tokenizer",
                hf_dir,
                "--output-prefix",
                str(prefix),
                "--workers",
                workers,
                "--quiet",
            ]
        )
        assert read_docs(f"{prefix}_text_document") == expected


def test_dtype_follows_vocabulary(tmp_path, sp_model):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    src = tmp_path / "in.jsonl"
    write_jsonl(src, [{"text": "fine"}])
    preprocess_data.main(
        ["--input", str(src), "--tokenizer", sp_model, "--output-prefix", str(tmp_path / "o"), "--quiet"]
    )
    assert IndexedDataset(str(tmp_path / "o_text_document")).index.dtype == np.uint16


def test_missing_tokenizer_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_tokenizer(str(tmp_path / "nope"))


def train_sentencepiece(tmp_path: Path, name: str = "tiny", **options) -> str:
    """A tiny SentencePiece model trained on a few lines written under ``tmp_path``."""
    import sentencepiece as spm

    corpus = tmp_path / f"{name}.txt"
    words = "alpha beta gamma delta documents tokens words lines model small text the of and"
    corpus.write_text("\n".join(" ".join(words.split()[i:] + words.split()[:i]) for i in range(14)) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / name), vocab_size=48, model_type="bpe",
        minloglevel=2, **options,
    )  # fmt: skip
    return str(tmp_path / f"{name}.model")


def megatron_args(src: Path, tokenizer_type: str, model: str, prefix: Path, *more: str) -> list[str]:
    return ["--input", str(src), "--json-keys", "text", "--tokenizer-type", tokenizer_type,
            "--tokenizer-model", model, "--output-prefix", str(prefix), "--quiet", *more]  # fmt: skip


DOCS = [{"text": "hello world"}, {"text": "the quick brown fox"}, {"text": "more documents and text"}]


def dataset_bytes(prefix: Path) -> tuple[bytes, bytes]:
    name = f"{prefix}_text_document"
    return Path(name + ".bin").read_bytes(), Path(name + ".idx").read_bytes()


def test_megatron_spelling_writes_the_same_bytes_as_tokenizer(tmp_path, hf_dir):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, DOCS)
    ours = ["--input", str(src), "--tokenizer", hf_dir, "--output-prefix", str(tmp_path / "ours"), "--quiet"]
    preprocess_data.main(ours)
    for name, more in [
        ("m1", ["--append-eod", "--workers", "1"]),
        ("m2", ["--append-eod", "--workers", "2"]),
    ]:
        preprocess_data.main(megatron_args(src, "HuggingFaceTokenizer", hf_dir, tmp_path / name, *more))
        assert dataset_bytes(tmp_path / name) == dataset_bytes(tmp_path / "ours")
    # --tokenizer and --tokenizer-model naming the same directory agree
    preprocess_data.main(
        megatron_args(src, "HuggingFaceTokenizer", hf_dir + "/", tmp_path / "both", "--append-eod")
        + ["--tokenizer", hf_dir]
    )
    assert dataset_bytes(tmp_path / "both") == dataset_bytes(tmp_path / "ours")
    tok = load_tokenizer(hf_dir)
    assert read_docs(str(tmp_path / "ours_text_document")) == [
        tok.encode(d["text"]) + [tok.eod_id] for d in DOCS
    ]


def test_sentencepiece_tokenizer_type_ends_documents_with_eod(tmp_path):
    import sentencepiece as spm

    model = train_sentencepiece(tmp_path)
    sp = spm.SentencePieceProcessor(model_file=model)
    assert sp.eos_id() >= 0
    src = tmp_path / "in.jsonl"
    write_jsonl(src, DOCS)
    summary = preprocess_data.main(
        megatron_args(src, "SentencePieceTokenizer", model, tmp_path / "sp", "--append-eod")
    )
    docs = read_docs(str(tmp_path / "sp_text_document"))
    assert summary["documents"] == len(DOCS) == len(docs)
    assert all(doc[-1] == sp.eos_id() and sp.eos_id() not in doc[:-1] for doc in docs)
    assert docs == [sp.encode(d["text"]) + [sp.eos_id()] for d in DOCS]
    preprocess_data.main(
        ["--input", str(src), "--tokenizer", model, "--output-prefix", str(tmp_path / "ours"), "--quiet"]
    )
    assert dataset_bytes(tmp_path / "sp") == dataset_bytes(tmp_path / "ours")
    # the type names the format, so a model file without the .model suffix is read too
    renamed = tmp_path / "tokenizer.spm"
    renamed.write_bytes(Path(model).read_bytes())
    preprocess_data.main(
        megatron_args(src, "SentencePieceTokenizer", str(renamed), tmp_path / "renamed", "--append-eod")
    )
    assert dataset_bytes(tmp_path / "renamed") == dataset_bytes(tmp_path / "ours")


def test_sentencepiece_model_without_eod_is_refused(tmp_path):
    model = train_sentencepiece(tmp_path, "noeos", eos_id=-1)
    src = tmp_path / "in.jsonl"
    write_jsonl(src, DOCS)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"^error: .*noeos.model has no end-of-document piece"):
        preprocess_data.main(megatron_args(src, "SentencePieceTokenizer", model, out / "o", "--append-eod"))
    with pytest.raises(SystemExit, match=r"^error: end-of-document token '<unk>' .*unknown piece"):
        preprocess_data.main(
            megatron_args(src, "SentencePieceTokenizer", model, out / "o", "--append-eod")
            + ["--eod-token", "<unk>"]
        )
    assert not out.exists()


# the tokenizer options of each refused command ({hf}/{sp}: a HF directory / SentencePiece model,
# {tmp}: the test's folder) and what the error must say
REFUSALS = {
    "no --append-eod": (
        "--tokenizer-type HuggingFaceTokenizer --tokenizer-model {hf}",
        r"--append-eod is missing: SDAR's document masks .* end-of-document token",
    ),
    "no --append-eod, model only": ("--tokenizer-model {sp}", r"--append-eod is missing"),
    "disagreeing paths": (
        "--tokenizer {sp} --tokenizer-type HuggingFaceTokenizer --tokenizer-model {hf} --append-eod",
        r"--tokenizer .* and --tokenizer-model .* name different tokenizers",
    ),
    "GPT2BPETokenizer": (
        "--tokenizer-type GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt --append-eod",
        r"GPT2BPETokenizer is not supported; this tool reads HuggingFaceTokenizer .* SentencePieceTokenizer",
    ),
    "Llama2Tokenizer": (
        "--tokenizer-type Llama2Tokenizer --tokenizer-model {sp} --append-eod",
        r"Llama2Tokenizer is not supported; this tool reads HuggingFaceTokenizer .* SentencePieceTokenizer",
    ),
    "vocab file with a supported type": (
        "--tokenizer-type HuggingFaceTokenizer --tokenizer-model {hf} --vocab-file vocab.json --append-eod",
        r"--vocab-file is not used",
    ),
    "missing model": (
        "--tokenizer-type HuggingFaceTokenizer --tokenizer-model {tmp}/absent --append-eod",
        r"--tokenizer-model .*absent does not exist.*nothing is downloaded",
    ),
    "HF type, SentencePiece file": (
        "--tokenizer-type HuggingFaceTokenizer --tokenizer-model {sp} --append-eod",
        r"HuggingFaceTokenizer reads a HF tokenizer directory, and .* is a file",
    ),
    "SentencePiece type, HF directory": (
        "--tokenizer-type SentencePieceTokenizer --tokenizer-model {hf} --append-eod",
        r"SentencePieceTokenizer reads a SentencePiece model file, and .* is a directory",
    ),
    "no tokenizer": ("--append-eod", r"name the tokenizer with --tokenizer PATH"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_tokenizer_options_refused_before_any_output(case, tmp_path, hf_dir, sp_model):
    options, message = REFUSALS[case]
    src = tmp_path / "in.jsonl"
    write_jsonl(src, DOCS)
    out = tmp_path / "out"
    paths = dict(hf=hf_dir, sp=sp_model, tmp=tmp_path)
    argv = ["--input", str(src), "--output-prefix", str(out / "o"), "--quiet"]
    argv += [word.format(**paths) for word in options.split()]
    with pytest.raises(SystemExit) as raised:
        preprocess_data.main(argv)
    assert str(raised.value.code).startswith("error: ")
    assert re.search(message, str(raised.value.code)), raised.value.code
    assert not out.exists()


def test_append_eod_flags_exclude_each_other_and_keep_the_tokenizer_default(tmp_path, sp_model):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, DOCS)
    base = ["--input", str(src), "--tokenizer", sp_model, "--quiet"]
    with pytest.raises(SystemExit):
        preprocess_data.main(
            [*base, "--output-prefix", str(tmp_path / "x"), "--append-eod", "--no-append-eod"]
        )
    assert not list(tmp_path.glob("x*"))
    tok = load_tokenizer(sp_model)
    preprocess_data.main([*base, "--output-prefix", str(tmp_path / "plain")])
    preprocess_data.main([*base, "--output-prefix", str(tmp_path / "noeod"), "--no-append-eod"])
    preprocess_data.main(
        megatron_args(src, "SentencePieceTokenizer", sp_model, tmp_path / "m", "--no-append-eod")
    )
    with_eod = [tok.encode(d["text"]) + [tok.eod_id] for d in DOCS]
    assert read_docs(str(tmp_path / "plain_text_document")) == with_eod
    assert read_docs(str(tmp_path / "noeod_text_document")) == [doc[:-1] for doc in with_eod]
    assert read_docs(str(tmp_path / "m_text_document")) == [doc[:-1] for doc in with_eod]


# inputs from which nothing can be written, and what the error must say about them
NOTHING_TO_WRITE = {
    "empty file": ("in.jsonl", "", r"empty \(or only blank lines\): .*in.jsonl"),
    "blank lines": ("in.jsonl", "\n  \n\n", r"empty \(or only blank lines\)"),
    "wrong key": (
        "in.jsonl",
        "".join(json.dumps({"content": f"doc {i}", "id": i}) + "\n" for i in range(12)),
        r"12 lines: missing key 'text' \(keys seen: 'content', 'id'\)\n.*in.jsonl:1: missing key",
    ),
    "JSON array": (
        "in.json",
        json.dumps([{"text": "one"}, {"text": "two"}], indent=2),
        r"1 line: the file is a JSON array, not JSON lines .*in.json:1:",
    ),
    "one-line JSON array": (
        "in.json",
        json.dumps([{"text": "one"}, {"text": "two"}]),
        r"the file is a JSON array, not JSON lines",
    ),
    "mixed reasons": (
        "in.jsonl",
        '{"text": ""}\n{broken\n{"text": 3}\n{"body": "x"}\n',
        r"1 line: empty text under 'text'\n  1 line: invalid JSON \(Expecting property name enclosed in "
        r"double quotes at column 2\)\n  1 line: key 'text' is int, not a string\n  1 line: missing key",
    ),
}


@pytest.mark.parametrize("case", sorted(NOTHING_TO_WRITE))
def test_nothing_to_write_is_an_error_that_counts_the_reasons(case, tmp_path, sp_model):
    name, text, message = NOTHING_TO_WRITE[case]
    (tmp_path / name).write_text(text)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as raised:
        preprocess_data.main(
            [
                "--input",
                str(tmp_path / name),
                "--tokenizer",
                sp_model,
                "--output-prefix",
                str(out / "o"),
                "--quiet",
            ]
        )
    error = str(raised.value.code)
    assert error.startswith("error: no documents to write; nothing was written"), error
    assert re.search(message, error, re.S), error
    assert list(out.iterdir()) == []  # no dataset, no temporary files


def test_bytes_that_are_not_utf8_are_reported_with_file_and_line(tmp_path, sp_model, capsys):
    tok = load_tokenizer(sp_model)
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_bytes(
        b'{"text": "first"}\n{"text": "caf\xe9"}\n{"text": "\\ud800 escape"}\n{"text": "last"}\n'
    )
    base = ["--tokenizer", sp_model, "--quiet"]
    summary = preprocess_data.main(["--input", str(jsonl), "--output-prefix", str(tmp_path / "j"), *base])
    assert read_docs(str(tmp_path / "j_text_document")) == [
        tok.encode(t) + [tok.eod_id] for t in ("first", "last")
    ]
    assert summary["dropped_by_reason"] == {"not UTF-8": 1, "unpaired surrogate under 'text'": 1}
    printed = capsys.readouterr().out
    assert f"{jsonl}:2: not UTF-8 (byte 0xe9 at column 14)" in printed
    assert f"{jsonl}:3: unpaired surrogate under 'text' (\\ud800 at character 1)" in printed
    with pytest.raises(SystemExit, match=r"in.jsonl:2: not UTF-8 \(byte 0xe9 at column 14\)"):
        preprocess_data.main(
            ["--input", str(jsonl), "--output-prefix", str(tmp_path / "s"), "--strict", *base]
        )

    text = tmp_path / "in.txt"
    text.write_bytes(b"good one\nstill one\n\nbad \xff\ntwo\n\nthree\n")
    expected = {
        "paragraph": (["good one\nstill one", "three"], "in.txt:4: not UTF-8 (byte 0xff at column 5; its "
                      "paragraph, from line 4, is skipped)"),
        "line": (["good one", "still one", "two", "three"], "in.txt:4: not UTF-8 (byte 0xff at column 5)"),
    }  # fmt: skip
    for unit, (docs, reported) in expected.items():
        prefix = tmp_path / unit
        preprocess_data.main(
            ["--input", str(text), "--output-prefix", str(prefix), "--text-unit", unit, *base]
        )
        assert read_docs(f"{prefix}_text_document") == [tok.encode(d) + [tok.eod_id] for d in docs]
        assert reported in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"in.txt:4: not UTF-8 \(byte 0xff at column 5; the file, one "):
        preprocess_data.main(
            ["--input", str(text), "--output-prefix", str(tmp_path / "f"), "--text-unit", "file", *base]
        )
    assert not list(tmp_path.glob("[sf]_*"))


def test_leftovers_of_a_killed_run_are_removed_on_the_next_start(tmp_path, sp_model, capsys):
    import subprocess
    import sys

    src = tmp_path / "in.jsonl"
    write_jsonl(src, DOCS)
    name = tmp_path / "o_text_document"
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = int(ended.stdout)
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [Path(f"{name}.tmp{dead}{ext}") for ext in (".bin", ".idx")]
        live = Path(f"{name}.tmp{running.pid}.bin")
        for path in [*stale, live]:
            path.write_bytes(b"partial")
        preprocess_data.main(
            ["--input", str(src), "--tokenizer", sp_model, "--output-prefix", str(tmp_path / "o")]
        )
        err = capsys.readouterr().err
        assert (
            f"note: removed {stale[0]}, {stale[1]}: left by an interrupted run (process {dead} is no " in err
        )
        assert (
            f"note: left alone {live}: temporary files of process {running.pid}, which is still running"
            in err
        )
        assert not any(p.exists() for p in stale) and live.exists()
        assert len(read_docs(str(name))) == len(DOCS)
    finally:
        running.kill()
        running.wait()


def test_progress_line_goes_to_stderr_with_rate_and_eta(tmp_path, sp_model, capsys):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, DOCS * 4)
    args = ["--input", str(src), "--tokenizer", sp_model, "--output-prefix", str(tmp_path / "o")]
    preprocess_data.main([*args, "--log-interval", "5"])
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 3, lines  # documents 5 and 10, and the last line
    size = src.stat().st_size  # read in buffers: so small a file is read at once
    assert re.fullmatch(
        rf"5 documents, [\d,]+ documents/s, {size} B of {size} B \(100%\) read, .*, ETA 0s", lines[0]
    )
    assert re.fullmatch(rf"12 documents, .*, {size} B of {size} B \(100%\) read, .*, done in \d+s", lines[2])
    assert "documents/s" not in captured.out
    preprocess_data.main([*args, "--log-interval", "5", "--quiet", "--overwrite"])
    assert capsys.readouterr().err == ""
