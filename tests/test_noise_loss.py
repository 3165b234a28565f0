"""The noising process, the SDAR batch layout, the Eq. 7 loss and the SDAR settings' validation."""

from __future__ import annotations

import pytest
import torch

from megatron_sdar.batch import build_sdar_batch
from megatron_sdar.config import SDARConfig
from megatron_sdar.loss import sdar_loss
from megatron_sdar.masks import document_ids_from_lengths, make_layout
from megatron_sdar.noise import apply_noise, sample_t

MASK = 99


def docs(*lengths: int) -> torch.Tensor:
    return document_ids_from_lengths(list(lengths)).unsqueeze(0)


def test_t_is_constant_per_document_and_differs_between_documents():
    doc_ids = docs(5, 7, 4).repeat(3, 1)
    t = sample_t(doc_ids, torch.Generator().manual_seed(0))
    for row in range(3):
        for d in range(3):
            vals = t[row][doc_ids[row] == d]
            assert torch.all(vals == vals[0])
        assert len(set(t[row].tolist())) == 3
    assert not torch.equal(t[0], t[1])  # rows draw independently


def test_t_per_block():
    doc_ids = docs(6, 10)
    blocks = make_layout(doc_ids, 4, "document")[:, 1]
    t = sample_t(doc_ids, torch.Generator().manual_seed(0), unit="block", blocks=blocks)
    units = [(int(d), int(b)) for d, b in zip(doc_ids[0], blocks[0])]
    for u in set(units):
        vals = t[0][[i for i, x in enumerate(units) if x == u]]
        assert torch.all(vals == vals[0])
    assert len(set(t[0].tolist())) == len(set(units)) == 5
    with pytest.raises(ValueError, match="block indices"):
        sample_t(doc_ids, None, unit="block")


def test_only_eligible_tokens_are_masked_and_p_follows_t():
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 50, (4, 64), generator=gen)
    eligible = torch.rand((4, 64), generator=gen) < 0.6
    doc_ids = docs(20, 30, 14).repeat(4, 1)
    out = apply_noise(tokens, eligible, doc_ids, MASK, torch.Generator().manual_seed(1), eps=1e-3)
    assert not out.masked[~eligible].any()
    assert torch.equal(out.noised_tokens[out.masked], torch.full((int(out.masked.sum()),), MASK))
    assert torch.equal(out.noised_tokens[~out.masked], tokens[~out.masked])
    torch.testing.assert_close(out.mask_prob, (1 - 1e-3) * out.t + 1e-3)


def test_every_row_with_eligible_tokens_gets_a_masked_token():
    tokens = torch.arange(40).reshape(4, 10)
    eligible = torch.zeros(4, 10, dtype=torch.bool)
    eligible[0, 3] = True  # a single eligible token: masked with probability p, forced otherwise
    eligible[1] = True
    # eps=0 and many draws: rows 0 and 1 must always have a masked token, rows 2-3 never.
    for seed in range(200):
        out = apply_noise(
            tokens, eligible, docs(10).repeat(4, 1), MASK, torch.Generator().manual_seed(seed), eps=0.0
        )
        assert out.masked[0, 3] and out.masked[0].sum() == 1
        assert out.masked[1].any()
        assert not out.masked[2:].any()


def test_noise_is_reproducible_and_rate_matches_expectation():
    tokens = torch.randint(0, 50, (64, 128))
    eligible = torch.ones_like(tokens, dtype=torch.bool)
    doc_ids = docs(128).repeat(64, 1)
    a = apply_noise(tokens, eligible, doc_ids, MASK, torch.Generator().manual_seed(5))
    b = apply_noise(tokens, eligible, doc_ids, MASK, torch.Generator().manual_seed(5))
    c = apply_noise(tokens, eligible, doc_ids, MASK, torch.Generator().manual_seed(6))
    assert torch.equal(a.masked, b.masked) and torch.equal(a.t, b.t)
    assert not torch.equal(a.masked, c.masked)
    rate = torch.stack(
        [
            apply_noise(tokens, eligible, doc_ids, MASK, torch.Generator().manual_seed(s))
            .masked.float()
            .mean()
            for s in range(20)
        ]
    ).mean()
    assert abs(rate.item() - ((1 - 1e-3) * 0.5 + 1e-3)) < 0.03


def test_bad_noise_arguments():
    tokens = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="eps"):
        apply_noise(tokens, tokens.bool(), tokens, MASK, eps=1.0)
    with pytest.raises(ValueError, match="same"):
        apply_noise(tokens, tokens[:, :4].bool(), tokens, MASK)


def test_batch_layout_and_positions():
    tokens = torch.arange(10, 22).unsqueeze(0)
    doc_ids = docs(5, 7)
    eligible = torch.ones_like(tokens, dtype=torch.bool)
    sdar = SDARConfig(block_size=4, mask_token_id=MASK, position_ids="document")
    batch = build_sdar_batch(tokens, doc_ids, eligible, sdar, torch.Generator().manual_seed(0))
    assert torch.equal(batch.input_ids[:, 12:], tokens) and torch.equal(batch.labels, tokens)
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6] * 2
    assert batch.layout.shape == (1, 2, 12)
    assert batch.layout[0, 1].tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 1, 1]
    continuous = build_sdar_batch(tokens, doc_ids, eligible, SDARConfig(block_size=4, mask_token_id=MASK))
    assert continuous.position_ids[0].tolist() == list(range(12)) * 2
    with pytest.raises(ValueError, match="block size 5"):
        build_sdar_batch(tokens, doc_ids, eligible, SDARConfig(block_size=5, mask_token_id=MASK))


def test_per_row_generators_make_noise_a_function_of_the_sample():
    tokens = torch.randint(0, 50, (2, 32))
    doc_ids = docs(32).repeat(2, 1)
    eligible = torch.ones_like(tokens, dtype=torch.bool)
    sdar = SDARConfig(block_size=4, mask_token_id=MASK)
    pair = build_sdar_batch(
        tokens, doc_ids, eligible, sdar, [torch.Generator().manual_seed(s) for s in (7, 8)]
    )
    alone = build_sdar_batch(tokens[1:], doc_ids[1:], eligible[1:], sdar, torch.Generator().manual_seed(8))
    assert torch.equal(pair.masked[1], alone.masked[0]) and torch.equal(pair.t[1], alone.t[0])


def small_batch():
    """Two rows of 4 tokens with hand-picked masks and probabilities."""
    tokens = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    batch = build_sdar_batch(
        tokens, torch.zeros_like(tokens), torch.ones_like(tokens, dtype=torch.bool),
        SDARConfig(block_size=2, mask_token_id=MASK), torch.Generator().manual_seed(0),
    )  # fmt: skip
    batch.masked = torch.tensor([[True, False, True, False], [False, False, False, True]])
    batch.mask_prob = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.25, 0.25, 0.25, 0.25]])
    batch.eligible = torch.tensor([[True, True, True, True], [False, True, True, True]])
    batch.t = torch.tensor([[0.4, 0.4, 0.4, 0.4], [0.2, 0.2, 0.2, 0.2]])
    return batch


def test_loss_by_hand():
    batch = small_batch()
    ce = torch.tensor([[1.0, 9.0, 2.0, 9.0], [9.0, 9.0, 9.0, 3.0]])
    correct = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
    output = torch.stack([ce, correct], dim=-1)
    loss_sum, num_tokens, report = sdar_loss(output, batch, "eligible")
    # masked: (1.0 / 0.5) + (2.0 / 0.5) + (3.0 / 0.25) = 2 + 4 + 12 = 18; eligible tokens: 7
    assert loss_sum.item() == pytest.approx(18.0) and int(num_tokens) == 7
    assert report["lm loss"].tolist() == pytest.approx([18.0, 7.0])
    assert report["masked ce"].tolist() == pytest.approx([6.0, 3.0])
    assert report["masked acc"].tolist() == pytest.approx([2.0, 3.0])
    assert report["mean t"].tolist() == pytest.approx([0.4 * 4 + 0.2 * 3, 7.0])
    _, masked_count, _ = sdar_loss(output, batch, "masked")
    assert int(masked_count) == 3


def test_loss_from_logits_and_global_normalisation():
    """Eq. 7 from real logits, and micro-batches combined by their global token count."""
    torch.manual_seed(0)
    batches, outputs = [], []
    for rows in (1, 3):  # different numbers of eligible tokens per micro-batch
        tokens = torch.randint(0, 20, (rows, 16))
        eligible = torch.rand(rows, 16) < 0.7
        eligible[:, 0] = True
        sdar = SDARConfig(block_size=4, mask_token_id=19)
        b = build_sdar_batch(
            tokens, torch.zeros_like(tokens), eligible, sdar, torch.Generator().manual_seed(rows)
        )
        logits = torch.randn(rows, 16, 20)
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 20), tokens.reshape(-1), reduction="none")
        correct = (logits.argmax(-1) == tokens).float()
        batches.append(b)
        outputs.append(torch.stack([ce.reshape(rows, 16), correct], -1))
    sums, counts = zip(*[sdar_loss(o, b)[:2] for o, b in zip(outputs, batches)])
    global_loss = sum(s.item() for s in sums) / sum(int(c) for c in counts)
    # The same quantity written directly over both micro-batches at once.
    ce_all = torch.cat([o[..., 0].flatten() for o in outputs])
    masked_all = torch.cat([b.masked.flatten() for b in batches])
    p_all = torch.cat([b.mask_prob.flatten() for b in batches])
    eligible_all = torch.cat([b.eligible.flatten() for b in batches])
    direct = (ce_all[masked_all] / p_all[masked_all]).sum() / eligible_all.sum()
    assert global_loss == pytest.approx(direct.item(), rel=1e-6)
    per_batch_mean = sum(s.item() / int(c) for s, c in zip(sums, counts)) / 2
    assert abs(per_batch_mean - global_loss) > 1e-3  # averaging per micro-batch would be wrong


def test_settings_validation():
    SDARConfig(block_size=4, mask_token_id=5).validate(64, 100, {"end-of-document": 1})
    with pytest.raises(ValueError, match=r"sequence length 62 is not a multiple of the SDAR block size 4"):
        SDARConfig(block_size=4, mask_token_id=5).validate(62, 100)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        SDARConfig(block_size=4, mask_token_id=100).validate(64, 100)
    with pytest.raises(ValueError, match="padding token"):
        SDARConfig(block_size=4, mask_token_id=7).validate(64, 100, {"padding": 7})
    with pytest.raises(ValueError, match="noise-eps"):
        SDARConfig(block_size=4, mask_token_id=5, noise_eps=-0.1).validate(64, 100)
    with pytest.raises(ValueError, match="block-size must be >= 1"):
        SDARConfig(block_size=0, mask_token_id=5).validate(64)
    SDARConfig(block_size=4, mask_token_id=-1).validate(64)  # tokens are checked once the vocabulary is known
    with pytest.raises(ValueError):
        SDARConfig(loss_normalizer="tokens")
