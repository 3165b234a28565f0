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
from tests.test_generation import MASK, VOCAB, megatron_qwen3, qwen3  # noqa: F401 (fixtures)


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


def test_diffusion_bound_equals_the_training_loss(qwen3, megatron_qwen3):  # noqa: F811
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


def test_next_token_nll_matches_transformers(qwen3):  # noqa: F811
    hf, _ = qwen3
    windows = torch.randint(2, VOCAB - 1, (1, 16), generator=torch.Generator().manual_seed(6))
    got = next_token_nll(HFBackend(hf), windows, eod_id=1)
    with torch.no_grad():
        expected = hf(windows, labels=windows).loss.item()
    assert abs(got["nll"] - expected) < 1e-4
