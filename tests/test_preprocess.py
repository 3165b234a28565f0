"""tools/preprocess_data.py: round trips through Megatron's IndexedDataset, bad lines, safety."""

from __future__ import annotations

import json
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
