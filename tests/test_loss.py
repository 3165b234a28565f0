"""The SDAR loss (Eq. 7), its normalisers and report, and ``SDARConfig.validate``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_sdar.batch import SDARBatch, build_sdar_batch
from megatron_sdar.config import SDARConfig
from megatron_sdar.loss import sdar_loss
from megatron_sdar.masks import document_ids_from_lengths


def hand_batch(
    masked: list[list[int]],
    eligible: list[list[int]],
    mask_prob: list[list[float]],
    t: list[list[float]],
) -> SDARBatch:
    """An ``SDARBatch`` holding exactly the fields the loss reads (the rest are placeholders)."""
    masked_t = torch.tensor(masked, dtype=torch.bool)
    b, seq = masked_t.shape
    return SDARBatch(
        input_ids=torch.zeros(b, 2 * seq, dtype=torch.int64),
        position_ids=torch.zeros(b, 2 * seq, dtype=torch.int64),
        layout=torch.zeros(b, 2, seq, dtype=torch.int32),
        labels=torch.zeros(b, seq, dtype=torch.int64),
        eligible=torch.tensor(eligible, dtype=torch.bool),
        masked=masked_t,
        mask_prob=torch.tensor(mask_prob, dtype=torch.float32),
        t=torch.tensor(t, dtype=torch.float32),
    )


def model_output(ce: list[list[float]], correct: list[list[int]]) -> torch.Tensor:
    return torch.stack([torch.tensor(ce), torch.tensor(correct, dtype=torch.float32)], dim=-1)


# One row of four tokens: the first three eligible, tokens 0 and 2 masked.
CE = [[2.0, 3.0, 1.0, 4.0]]
CORRECT = [[1, 0, 0, 1]]
MASKED = [[1, 0, 1, 0]]
ELIGIBLE = [[1, 1, 1, 0]]
P = [[0.5, 0.5, 0.25, 1.0]]
T = [[0.2, 0.4, 0.6, 0.8]]


def test_loss_by_hand_eligible_normaliser():
    batch = hand_batch(MASKED, ELIGIBLE, P, T)
    loss_sum, num_tokens, report = sdar_loss(model_output(CE, CORRECT), batch, "eligible")
    # sum over masked of CE / p = 2.0 / 0.5 + 1.0 / 0.25 = 4 + 4 = 8; three eligible tokens.
    assert loss_sum.shape == () and float(loss_sum) == pytest.approx(8.0)
    assert int(num_tokens) == 3
    assert float(loss_sum) / int(num_tokens) == pytest.approx(8.0 / 3.0)

    assert set(report) == {"lm loss", "masked ce", "masked acc", "mean t"}
    for value in report.values():
        assert value.shape == (2,)
    torch.testing.assert_close(report["lm loss"], torch.tensor([8.0, 3.0]))
    torch.testing.assert_close(report["masked ce"], torch.tensor([2.0 + 1.0, 2.0]))  # plain CE sum
    torch.testing.assert_close(report["masked acc"], torch.tensor([1.0, 2.0]))  # token 0 right, 2 wrong
    torch.testing.assert_close(report["mean t"], torch.tensor([0.2 + 0.4 + 0.6, 3.0]))


def test_loss_by_hand_masked_normaliser():
    batch = hand_batch(MASKED, ELIGIBLE, P, T)
    loss_sum, num_tokens, report = sdar_loss(model_output(CE, CORRECT), batch, "masked")
    assert float(loss_sum) == pytest.approx(8.0)
    assert int(num_tokens) == 2
    torch.testing.assert_close(report["lm loss"], torch.tensor([8.0, 2.0]))
    torch.testing.assert_close(report["mean t"], torch.tensor([1.2, 3.0]))


def test_default_normaliser_is_eligible():
    batch = hand_batch(MASKED, ELIGIBLE, P, T)
    assert int(sdar_loss(model_output(CE, CORRECT), batch)[1]) == 3


def test_unmasked_positions_do_not_reach_the_loss_or_gradient():
    batch = hand_batch(MASKED, ELIGIBLE, P, T)
    ce = torch.tensor(CE, requires_grad=True)
    output = torch.stack([ce, torch.tensor(CORRECT, dtype=torch.float32)], dim=-1)
    loss_sum, _, _ = sdar_loss(output, batch)
    loss_sum.backward()
    # d(loss_sum)/d(CE_i) = 1/p_i on masked positions, 0 elsewhere.
    torch.testing.assert_close(ce.grad, torch.tensor([[2.0, 0.0, 4.0, 0.0]]))


def test_normalisation_is_global_across_micro_batches():
    # Micro-batch 1: 2 eligible tokens; micro-batch 2: 6 eligible tokens (same window length 6).
    ce1 = [[1.0, 2.0, 9.0, 9.0, 9.0, 9.0]]
    mb1 = hand_batch([[1, 1, 0, 0, 0, 0]], [[1, 1, 0, 0, 0, 0]], [[0.5, 1.0, 1, 1, 1, 1]], [[0.5] * 6])
    ce2 = [[3.0, 1.0, 2.0, 6.0, 5.0, 4.0]]
    mb2 = hand_batch([[1, 0, 0, 1, 0, 1]], [[1] * 6], [[0.75, 0.5, 0.5, 0.5, 0.5, 0.25]], [[0.4] * 6])
    zeros = [[0] * 6]

    s1, n1, _ = sdar_loss(model_output(ce1, zeros), mb1)
    s2, n2, _ = sdar_loss(model_output(ce2, zeros), mb2)
    # By hand: s1 = 1/0.5 + 2/1 = 4; s2 = 3/0.75 + 6/0.5 + 4/0.25 = 4 + 12 + 16 = 32.
    assert (float(s1), int(n1)) == pytest.approx((4.0, 2))
    assert (float(s2), int(n2)) == pytest.approx((32.0, 6))
    global_loss = (float(s1) + float(s2)) / (int(n1) + int(n2))
    assert global_loss == pytest.approx(36.0 / 8.0)

    # Eq. 7 over the two micro-batches as one batch of two rows.
    ce_all = torch.tensor(ce1 + ce2)
    masked_all = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 0, 0, 1, 0, 1]], dtype=torch.bool)
    eligible_all = torch.tensor([[1, 1, 0, 0, 0, 0], [1] * 6], dtype=torch.bool)
    p_all = torch.tensor([[0.5, 1.0, 1, 1, 1, 1], [0.75, 0.5, 0.5, 0.5, 0.5, 0.25]])
    eq7 = sum(
        float(ce_all[r, i] / p_all[r, i]) for r in range(2) for i in range(6) if masked_all[r, i]
    ) / int(eligible_all.sum())
    assert global_loss == pytest.approx(eq7)

    together = hand_batch(
        masked_all.int().tolist(), eligible_all.int().tolist(), p_all.tolist(), [[0.5] * 6] * 2
    )
    s, n, _ = sdar_loss(model_output(ce_all.tolist(), zeros * 2), together)
    assert float(s) / int(n) == pytest.approx(eq7)

    # Averaging per-micro-batch ratios weights tokens unequally and gives another number.
    per_micro_batch_mean = (float(s1) / int(n1) + float(s2) / int(n2)) / 2
    assert per_micro_batch_mean == pytest.approx((2.0 + 32.0 / 6.0) / 2)
    assert abs(per_micro_batch_mean - global_loss) > 0.5


def test_loss_from_logits_matches_eq7_formula():
    """Per-token CE computed from ``[L, b, V]`` logits, fed to the loss, against log-softmax by hand."""
    seq, b, vocab, mask_id = 16, 2, 11, 10
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab - 1, (b, seq), generator=g)
    doc_ids = torch.stack([document_ids_from_lengths([5, 11]), document_ids_from_lengths([16])])
    eligible = torch.ones(b, seq, dtype=torch.bool)
    eligible[1, :4] = False
    config = SDARConfig(block_size=4, mask_token_id=mask_id)
    batch = build_sdar_batch(tokens, doc_ids, eligible, config, torch.Generator().manual_seed(1))
    assert batch.masked.sum() >= 2

    logits = torch.randn(seq, b, vocab, generator=g, requires_grad=True)  # Megatron's [s, b, V]
    by_token = logits.transpose(0, 1)  # [b, L, V]
    ce = F.cross_entropy(by_token.reshape(-1, vocab), batch.labels.reshape(-1), reduction="none").view(b, seq)
    correct = (by_token.argmax(dim=-1) == batch.labels).float()
    loss_sum, num_tokens, report = sdar_loss(torch.stack([ce, correct], dim=-1), batch)

    total, right = 0.0, 0
    for r in range(b):
        for i in range(seq):
            if not batch.masked[r, i]:
                continue
            z = [float(v) for v in logits[i, r]]
            log_norm = math.log(sum(math.exp(v) for v in z))
            total += (log_norm - z[int(tokens[r, i])]) / float(batch.mask_prob[r, i])
            right += int(max(range(vocab), key=lambda v: z[v]) == int(tokens[r, i]))
    n_eligible = int(eligible.sum())
    assert int(num_tokens) == n_eligible == 28
    assert float(loss_sum) / int(num_tokens) == pytest.approx(total / n_eligible, rel=1e-5)
    torch.testing.assert_close(report["masked acc"], torch.tensor([float(right), float(batch.masked.sum())]))

    # The gradient reaches only the logits of masked noised positions.
    loss_sum.backward()
    touched = logits.grad.abs().sum(dim=-1).transpose(0, 1) > 0  # [b, L]
    assert torch.equal(touched, batch.masked)


# --------------------------------------------------------------------------------------------------
# SDARConfig.validate
# --------------------------------------------------------------------------------------------------


def test_validate_accepts_a_good_configuration():
    config = SDARConfig(block_size=4, mask_token_id=151669)
    config.validate(4096)
    config.validate(4096, vocab_size=151936, special_token_ids={"eod": 151643, "pad": 151643, "bos": None})


def test_validate_sequence_length_not_a_multiple_of_block_size():
    with pytest.raises(ValueError) as info:
        SDARConfig(block_size=16, mask_token_id=5).validate(1000)
    message = str(info.value)
    assert "1000" in message and "16" in message


def test_validate_block_size_below_one():
    with pytest.raises(ValueError):
        SDARConfig(block_size=0, mask_token_id=5).validate(64)


@pytest.mark.parametrize("mask_token_id", [-1, 128, 1000])
def test_validate_mask_token_outside_vocabulary(mask_token_id):
    with pytest.raises(ValueError, match=str(mask_token_id)):
        SDARConfig(block_size=4, mask_token_id=mask_token_id).validate(64, vocab_size=128)


def test_validate_token_checks_wait_for_the_vocabulary():
    SDARConfig(block_size=4, mask_token_id=-1).validate(64)  # vocabulary not known yet


def test_validate_mask_token_equal_to_a_special_token():
    config = SDARConfig(block_size=4, mask_token_id=7)
    with pytest.raises(ValueError, match="eod"):
        config.validate(64, vocab_size=128, special_token_ids={"pad": 3, "eod": 7})
    config.validate(64, vocab_size=128, special_token_ids={"pad": 3, "eod": 8})


@pytest.mark.parametrize("eps", [-0.01, 1.0, 2.0])
def test_validate_bad_noise_eps(eps):
    with pytest.raises(ValueError, match="eps"):
        SDARConfig(block_size=4, mask_token_id=5, noise_eps=eps).validate(64)


def test_config_rejects_unknown_enum_values():
    with pytest.raises(ValueError):
        SDARConfig(clean_attention="bidirectional")
    with pytest.raises(ValueError):
        SDARConfig(loss_normalizer="tokens")
