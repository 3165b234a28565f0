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


def test_evaluate_tool(tmp_path):
    """tools/evaluate.py on an SDAR export: a table row per decoding setting and the text bound."""
    from tools import evaluate as evaluate_tool

    _, export, _ = sdar_export(tmp_path)
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
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["tokens_per_forward"] >= 1.0 for r in report["math"])
    assert report["math"][1]["tokens_per_forward"] == 1.0  # tau 1: one token per forward
    assert report["text"]["diffusion_bound"] > 0 and json.loads((tmp_path / "eval.json").read_text())["math"]
    ar = evaluate_tool.main(
        ["--hf-dir", str(export), "--mode", "ar", "--text", str(text), "--seq-length", "16"]
    )
    assert ar["text"]["nll"] > 0
