"""Evaluation: answer extraction, the math-problem reader, and held-out scores that equal the
training objective (Eq. 7 from the training model) and transformers' next-token loss."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_sdar.batch import build_sdar_batch
from megatron_sdar.config import SDARConfig
from megatron_sdar.evaluation import diffusion_bound, extract_answer, next_token_nll, read_math_problems
from megatron_sdar.inference import HFBackend, MegatronBackend
from megatron_sdar.loss import sdar_loss
from megatron_sdar.masks import document_ids_from_eod
from tests.helpers import megatron_twin, sdar_export
from tests.test_conversion import VOCAB, hf_model

MASK = VOCAB - 1


@pytest.fixture(scope="module")
def qwen3():
    return hf_model("qwen3", False)


@pytest.fixture(scope="module")
def megatron_qwen3(qwen3):
    return megatron_twin(qwen3[0], SDARConfig(block_size=4, mask_token_id=MASK))


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """An SDAR export with a BPE tokenizer (block size 4), shared by the tool tests."""
    return sdar_export(tmp_path_factory.mktemp("export"))[1]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so she has 5 + 7 = 12 apples.\n#### 12", "12"),
        ("The answer is $1,234.", "1234"),
        ("We get \\boxed{-3.5} in the end, not 7", "-3.5"),
        ("first 3, then 4, finally 18.", "18"),
        ("#### 42.0", "42"),
        ("no digits here", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_read_math_problems(tmp_path):
    good = tmp_path / "gsm.jsonl"
    good.write_text(json.dumps({"question": "2+2?", "answer": "2 and 2 make 4\n#### 4"}) + "\n\n")
    assert read_math_problems(str(good))[0].answer == "4"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "2+2?", "answer": "four"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_math_problems(str(bad))


def test_diffusion_bound_equals_the_training_loss(qwen3, megatron_qwen3):
    hf, _ = qwen3
    sdar = SDARConfig(block_size=4, mask_token_id=MASK)
    windows = torch.randint(2, VOCAB - 1, (2, 16), generator=torch.Generator().manual_seed(5))
    windows[0, 7] = 1  # two documents in the first window
    got = diffusion_bound(HFBackend(hf), windows, eod_id=1, sdar=sdar, seed=3)
    gen = torch.Generator().manual_seed(3)
    total = count = 0.0
    for row in windows.split(1):
        batch = build_sdar_batch(
            row, document_ids_from_eod(row, 1), torch.ones_like(row, dtype=torch.bool), sdar, gen
        )
        with torch.no_grad():
            out = megatron_qwen3(batch.input_ids, batch.position_ids, batch.layout, labels=batch.labels)
        loss_sum, tokens, _ = sdar_loss(out, batch)
        total, count = total + float(loss_sum), count + float(tokens)
    assert abs(got["diffusion_bound"] - total / count) < 1e-4
    again = diffusion_bound(MegatronBackend(megatron_qwen3, VOCAB), windows, eod_id=1, sdar=sdar, seed=3)
    assert abs(again["diffusion_bound"] - got["diffusion_bound"]) < 1e-4


def test_next_token_nll_matches_transformers(qwen3):
    hf, _ = qwen3
    windows = torch.randint(2, VOCAB - 1, (1, 16), generator=torch.Generator().manual_seed(6))
    got = next_token_nll(HFBackend(hf), windows, eod_id=1)
    with torch.no_grad():
        expected = hf(windows, labels=windows).loss.item()
    assert abs(got["nll"] - expected) < 1e-4


def test_ragged_windows_score_every_token(qwen3, megatron_qwen3):
    """A last window shorter than the others (and not a whole number of blocks) is scored: its
    tokens count, and both back ends agree on it."""
    hf, _ = qwen3
    sdar = SDARConfig(block_size=4, mask_token_id=MASK)
    tokens = torch.randint(2, VOCAB - 1, (30,), generator=torch.Generator().manual_seed(7))
    windows = [tokens[:16], tokens[16:]]  # 16 + 14
    got = diffusion_bound(HFBackend(hf), windows, eod_id=1, sdar=sdar, seed=3, samples=2)
    assert got["tokens"] == 30 and got["diffusion_bound"] > 0
    same = diffusion_bound(
        MegatronBackend(megatron_qwen3, VOCAB), windows, eod_id=1, sdar=sdar, seed=3, samples=2
    )
    assert abs(same["diffusion_bound"] - got["diffusion_bound"]) < 1e-4
    assert next_token_nll(HFBackend(hf), windows, eod_id=1)["tokens"] == 15 + 13


def test_evaluate_tool(export, tmp_path):
    """tools/evaluate.py on an SDAR export: a table row per decoding setting and the text bound."""
    from tools import evaluate as evaluate_tool

    math = tmp_path / "gsm.jsonl"
    math.write_text(
        "".join(json.dumps({"question": f"the mask {i}", "answer": f"#### {i}"}) + "\n" for i in range(3))
    )
    text = tmp_path / "text.txt"
    text.write_text("the mask token is new\nblocks decode in parallel\n" * 20)
    report = evaluate_tool.main(
        ["--hf-dir", str(export), "--math", str(math), "--taus", "0.5", "1.0", "--block-sizes", "4", "8",
         "--max-new-tokens", "8", "--batch-size", "2", "--text", str(text), "--seq-length", "16",
         "--text-windows", "3", "--json-out", str(tmp_path / "eval.json")]
    )  # fmt: skip
    settings = [r["setting"] for r in report["math"]]
    assert settings == ["B=4 tau=0.5", "B=4 tau=1.0", "B=8 tau=0.5", "B=8 tau=1.0"]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["tokens_per_forward"] > 0.0 for r in report["math"])
    # tau 1 finalises one position per forward; only returned tokens count, so a last block cut at
    # --max-new-tokens (decoded whole) makes it at most one
    assert 0.5 < report["math"][1]["tokens_per_forward"] <= 1.0
    assert report["text"]["diffusion_bound"] > 0 and json.loads((tmp_path / "eval.json").read_text())["math"]
    ar = evaluate_tool.main(
        ["--hf-dir", str(export), "--mode", "ar", "--text", str(text), "--seq-length", "16"]
    )
    assert ar["text"]["nll"] > 0


def test_evaluate_tool_scores_all_of_the_text_split_by_paragraph(export, tmp_path, capsys):
    """Plain text is one document per blank-line separated paragraph (said in the summary), and the
    tokens after the last full window are scored in a shorter window, not dropped."""
    from transformers import AutoTokenizer

    from tools import evaluate as evaluate_tool

    paragraphs = ["the mask token is new\nblocks decode\nin parallel", "blocks decode", "the mask\ntoken"] * 3
    text = tmp_path / "held_out.txt"
    text.write_text("\n\n".join(paragraphs) + "\n")
    tok = AutoTokenizer.from_pretrained(export)
    total = sum(len(tok(p, add_special_tokens=False).input_ids) + 1 for p in paragraphs)
    assert total % 16  # a shorter last window
    report = evaluate_tool.main(["--hf-dir", str(export), "--text", str(text), "--seq-length", "16"])
    info = report["text_input"]
    assert (info["format"], info["document_unit"], info["documents"]) == ("text", "paragraph", 9)
    assert info["tokens"] == total and report["text"]["tokens"] == total
    assert info["windows"] == -(-total // 16) and info["last_window_tokens"] == total % 16
    printed = capsys.readouterr().out
    assert "9 documents (plain text, one per paragraph, split at blank lines; see --text-unit)" in printed
    assert f"(the last {total % 16})" in printed
    lines = evaluate_tool.main(
        ["--hf-dir", str(export), "--text", str(text), "--text-unit", "line", "--seq-length", "1000"]
    )
    assert lines["text_input"]["documents"] == 18 and lines["text_input"]["windows"] == 1  # one short window
    capped = evaluate_tool.main(
        ["--hf-dir", str(export), "--text", str(text), "--seq-length", "8", "--text-windows", "2"]
    )
    assert capped["text_input"]["stopped_at_text_windows"] and capped["text"]["tokens"] == 16
    assert "stopped at --text-windows 2" in capsys.readouterr().out


def test_evaluate_tool_reports_on_rank_zero_only(export, tmp_path, capsys, monkeypatch):
    from tools import evaluate as evaluate_tool

    math = tmp_path / "gsm.jsonl"
    math.write_text(json.dumps({"question": "the mask", "answer": "#### 3"}) + "\n")
    flags = ["--hf-dir", str(export), "--math", str(math), "--max-new-tokens", "4"]
    monkeypatch.setenv("RANK", "1")
    report = evaluate_tool.main([*flags, "--json-out", str(tmp_path / "rank1.json")])
    assert report["math"] and not (tmp_path / "rank1.json").exists() and capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    static = evaluate_tool.main([*flags, "--strategy", "low_confidence_static"])
    assert [r["setting"] for r in static["math"]] == ["B=4 low_confidence_static"]  # no tau: it reads none
    assert "low_confidence_static" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--taus applies to --strategy low_confidence_dynamic only"):
        evaluate_tool.main([*flags, "--strategy", "sequential", "--taus", "0.5"])
