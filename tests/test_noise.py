"""The SDAR noising process (``sample_t``, ``apply_noise``) and the 2L batch built from it."""

from __future__ import annotations

import pytest
import torch

from megatron_sdar.batch import build_sdar_batch
from megatron_sdar.config import PositionIds, SDARConfig
from megatron_sdar.masks import document_ids_from_lengths, make_layout
from megatron_sdar.noise import apply_noise, sample_t

MASK_ID = 1000


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def doc_rows(*rows: list[int]) -> torch.Tensor:
    return torch.stack([document_ids_from_lengths(lengths) for lengths in rows])


def units(doc_ids: torch.Tensor, blocks: torch.Tensor | None = None) -> list[list[tuple[int, ...]]]:
    """Per row, the unit label of every token: (document,) or (document, block)."""
    out = []
    for r in range(doc_ids.shape[0]):
        if blocks is None:
            out.append([(int(d),) for d in doc_ids[r]])
        else:
            out.append([(int(d), int(b)) for d, b in zip(doc_ids[r], blocks[r])])
    return out


def assert_constant_per_unit_and_distinct(t: torch.Tensor, labels: list[list[tuple[int, ...]]]) -> None:
    for r, row in enumerate(labels):
        value_of: dict[tuple[int, ...], float] = {}
        for i, u in enumerate(row):
            v = float(t[r, i])
            assert 0.0 <= v < 1.0
            assert value_of.setdefault(u, v) == v, f"row {r}: t varies inside unit {u}"
        assert len(set(value_of.values())) == len(value_of), f"row {r}: two units share a t"


# --------------------------------------------------------------------------------------------------
# sample_t
# --------------------------------------------------------------------------------------------------


def test_t_is_one_draw_per_document():
    doc_ids = doc_rows([5, 1, 9, 17], [32], [1] * 32, [3, 29])
    t = sample_t(doc_ids, gen(0))
    assert t.shape == doc_ids.shape and t.dtype == torch.float32
    assert_constant_per_unit_and_distinct(t, units(doc_ids))
    assert len(set(t[0].tolist())) == 4
    assert len(set(t[2].tolist())) == 32
    # Rows are independent: the single-document rows 1 and 3's first document do not share t.
    assert float(t[1, 0]) != float(t[3, 0])


@pytest.mark.parametrize("counting", ["document", "window"])
def test_t_per_block_is_one_draw_per_document_block(counting):
    doc_ids = doc_rows([6, 10, 3, 13], [32])
    blocks = make_layout(doc_ids, 4, counting)[:, 1]
    t = sample_t(doc_ids, gen(1), unit="block", blocks=blocks)
    labels = units(doc_ids, blocks)
    assert_constant_per_unit_and_distinct(t, labels)
    assert len(set(t[1].tolist())) == 8  # one 32-token document, 8 blocks
    # Per-document t would have only 4 values in row 0.
    assert len(set(t[0].tolist())) == len(set(labels[0])) > 4


def test_per_block_without_blocks_raises():
    doc_ids = doc_rows([8])
    with pytest.raises(ValueError):
        sample_t(doc_ids, gen(0), unit="block")
    with pytest.raises(ValueError):
        apply_noise(
            torch.zeros(1, 8, dtype=torch.long), torch.ones(1, 8, dtype=torch.bool), doc_ids, 5, unit="block"
        )


# --------------------------------------------------------------------------------------------------
# apply_noise
# --------------------------------------------------------------------------------------------------


def conditioned(p: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """Each token's masking probability given that its row has a masked token (rows with eligible
    tokens; others keep p): p / (1 - prod over the row's eligible tokens of (1 - p))."""
    none = torch.where(eligible, 1 - p.double(), 1.0).prod(-1, keepdim=True)
    out = (p.double() / (1 - none)).float()
    return torch.where(eligible.any(-1, keepdim=True), out, p)


@pytest.mark.parametrize("eps", [0.0, 1e-3, 0.3])
def test_only_eligible_tokens_are_masked_and_p_follows_t(eps):
    g = gen(11)
    tokens = torch.randint(0, 500, (6, 48), generator=g)
    eligible = torch.rand(6, 48, generator=g) < 0.5
    doc_ids = doc_rows([10, 20, 18], [48], [1] * 48, [7] * 6 + [6], [24, 24], [47, 1])
    out = apply_noise(tokens, eligible, doc_ids, MASK_ID, gen(2), eps=eps)

    assert out.masked.dtype == torch.bool
    assert not (out.masked & ~eligible).any()
    assert (out.noised_tokens[out.masked] == MASK_ID).all()
    assert torch.equal(out.noised_tokens[~out.masked], tokens[~out.masked])
    assert not (tokens == MASK_ID).any()
    assert torch.equal(out.masked, out.noised_tokens == MASK_ID)
    torch.testing.assert_close(
        out.mask_prob, conditioned((1 - eps) * out.t + eps, eligible), rtol=1e-5, atol=1e-7
    )
    assert ((out.mask_prob >= eps) & (out.mask_prob <= 1.0)).all()
    assert_constant_per_unit_and_distinct(out.t, units(doc_ids))
    assert out.masked.any(dim=-1).all()


def test_rows_with_eligible_tokens_always_get_a_masked_token():
    # 64 rows, each with exactly one eligible token. With eps = 0 that token is masked with
    # probability t only, so about half the rows need the forced token.
    rows, seq = 64, 16
    tokens = torch.arange(rows * seq).reshape(rows, seq)
    eligible = torch.zeros(rows, seq, dtype=torch.bool)
    where = torch.randint(0, seq, (rows,), generator=gen(4))
    eligible[torch.arange(rows), where] = True
    doc_ids = doc_rows(*([[seq]] * rows))
    for seed in range(5):
        out = apply_noise(tokens, eligible, doc_ids, MASK_ID, gen(seed), eps=0.0, empty_rows="force")
        assert torch.equal(out.masked, eligible)
        # The forced token does not change p.
        torch.testing.assert_close(out.mask_prob, out.t)


def test_forced_token_is_a_single_eligible_one():
    # Rows of many eligible tokens but tiny p: forcing adds exactly one masked token, where eligible.
    rows, seq = 200, 12
    tokens = torch.zeros(rows, seq, dtype=torch.long)
    eligible = torch.zeros(rows, seq, dtype=torch.bool)
    eligible[:, 4:9] = True
    doc_ids = doc_rows(*([[seq]] * rows))
    out = apply_noise(tokens, eligible, doc_ids, MASK_ID, gen(9), eps=0.0, empty_rows="force")
    counts = out.masked.sum(dim=-1)
    assert (counts >= 1).all()
    assert not (out.masked & ~eligible).any()
    # Rows whose p is very small almost surely drew nothing and were forced to exactly one token.
    tiny = out.t[:, 0] < 0.01
    assert tiny.any()
    assert (counts[tiny] == 1).all()


def test_rows_without_eligible_tokens_stay_clean():
    tokens = torch.randint(0, 500, (4, 20), generator=gen(0))
    eligible = torch.ones(4, 20, dtype=torch.bool)
    eligible[1] = False
    eligible[3] = False
    doc_ids = doc_rows([20], [5, 15], [20], [1] * 20)
    for seed in range(10):
        out = apply_noise(tokens, eligible, doc_ids, MASK_ID, gen(seed), eps=0.5)
        assert not out.masked[1].any() and not out.masked[3].any()
        assert torch.equal(out.noised_tokens[1], tokens[1])
        assert torch.equal(out.noised_tokens[3], tokens[3])
        assert out.masked[0].any() and out.masked[2].any()


def test_same_seed_same_noise_other_seed_other_noise():
    tokens = torch.randint(0, 500, (4, 64), generator=gen(0))
    eligible = torch.rand(4, 64, generator=gen(1)) < 0.8
    doc_ids = doc_rows([64], [30, 34], [16] * 4, [1] * 64)
    a = apply_noise(tokens, eligible, doc_ids, MASK_ID, gen(123))
    b = apply_noise(tokens, eligible, doc_ids, MASK_ID, gen(123))
    c = apply_noise(tokens, eligible, doc_ids, MASK_ID, gen(124))
    for field in ("noised_tokens", "masked", "mask_prob", "t"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.t, c.t)
    assert not torch.equal(a.masked, c.masked)


@pytest.mark.parametrize("eps", [1e-3, 0.2])
def test_empirical_masking_rate_matches_expected_p(eps):
    # E[p] = (1 - eps) E[t] + eps = (1 - eps) / 2 + eps. 2048 independent t draws (one per row)
    # give a standard error of about 0.29 / sqrt(2048) = 0.0064; the tolerance is several times that.
    rows, seq = 2048, 64
    tokens = torch.zeros(rows, seq, dtype=torch.long)
    eligible = torch.ones(rows, seq, dtype=torch.bool)
    doc_ids = doc_rows(*([[seq]] * rows))
    out = apply_noise(tokens, eligible, doc_ids, MASK_ID, gen(31), eps=eps)
    expected = (1 - eps) / 2 + eps
    assert float(out.masked.float().mean()) == pytest.approx(expected, abs=0.03)
    assert float(out.mask_prob.mean()) == pytest.approx(expected, abs=0.03)
    # Given p, tokens are masked independently: the per-row rate tracks the row's p.
    row_rate = out.masked.float().mean(dim=-1)
    assert float((row_rate - out.mask_prob[:, 0]).abs().mean()) < 0.1


@pytest.mark.parametrize("eps", [-0.1, 1.0, 1.5])
def test_bad_eps_raises(eps):
    tokens = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="eps"):
        apply_noise(
            tokens, torch.ones_like(tokens, dtype=torch.bool), doc_rows([8]), MASK_ID, gen(0), eps=eps
        )


def test_mismatched_shapes_raise():
    tokens = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError):
        apply_noise(tokens, torch.ones(2, 7, dtype=torch.bool), doc_rows([8], [8]), MASK_ID)


# --------------------------------------------------------------------------------------------------
# build_sdar_batch
# --------------------------------------------------------------------------------------------------


def small_batch():
    tokens = torch.tensor(
        [
            [11, 12, 13, 14, 15, 16, 17, 18],
            [21, 22, 23, 24, 25, 26, 27, 28],
        ]
    )
    doc_ids = doc_rows([3, 5], [8])
    eligible = torch.tensor(
        [
            [1, 1, 1, 1, 1, 1, 1, 1],
            [0, 0, 0, 1, 1, 1, 1, 1],  # a prompt of three tokens stays clean
        ],
        dtype=torch.bool,
    )
    return tokens, doc_ids, eligible


def test_batch_input_is_noised_then_clean_copy():
    tokens, doc_ids, eligible = small_batch()
    config = SDARConfig(block_size=4, mask_token_id=MASK_ID, noise_eps=0.3)
    batch = build_sdar_batch(tokens, doc_ids, eligible, config, gen(0))
    seq = tokens.shape[1]
    assert batch.input_ids.shape == (2, 2 * seq) and batch.input_ids.dtype == torch.int64
    assert torch.equal(batch.input_ids[:, seq:], tokens)
    x_t = torch.where(batch.masked, torch.full_like(tokens, MASK_ID), tokens)
    assert torch.equal(batch.input_ids[:, :seq], x_t)
    assert torch.equal(batch.labels, tokens)
    assert torch.equal(batch.eligible, eligible)
    assert not (batch.masked & ~eligible).any()
    assert batch.masked.any(dim=-1).all()
    torch.testing.assert_close(batch.mask_prob, conditioned(0.7 * batch.t + 0.3, eligible))


def test_batch_position_ids_and_layout_hand_case():
    tokens, doc_ids, eligible = small_batch()
    base = dict(block_size=4, mask_token_id=MASK_ID)

    continuous = build_sdar_batch(tokens, doc_ids, eligible, SDARConfig(**base), gen(0))
    assert continuous.position_ids.tolist() == [list(range(8)) * 2] * 2

    restart = build_sdar_batch(
        tokens, doc_ids, eligible, SDARConfig(**base, position_ids=PositionIds.DOCUMENT), gen(0)
    )
    assert restart.position_ids.tolist() == [
        [0, 1, 2, 0, 1, 2, 3, 4] * 2,
        list(range(8)) * 2,
    ]
    for batch in (continuous, restart):
        seq = tokens.shape[1]
        assert batch.position_ids.dtype == torch.int64
        assert torch.equal(batch.position_ids[:, :seq], batch.position_ids[:, seq:])

    assert restart.layout.shape == (2, 2, 8) and restart.layout.dtype == torch.int32
    assert restart.layout[:, 0].tolist() == [[0, 0, 0, 1, 1, 1, 1, 1], [0] * 8]
    assert restart.layout[:, 1].tolist() == [[0, 0, 0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 1, 1, 1, 1]]
    window = build_sdar_batch(tokens, doc_ids, eligible, SDARConfig(**base, block_counting="window"), gen(0))
    assert window.layout[:, 1].tolist() == [[0, 0, 0, 0, 1, 1, 1, 1]] * 2


def test_batch_per_block_noise_uses_the_layout_blocks():
    tokens = torch.arange(32).reshape(1, 32)
    doc_ids = doc_rows([6, 26])
    config = SDARConfig(block_size=4, mask_token_id=MASK_ID, noise_unit="block")
    batch = build_sdar_batch(tokens, doc_ids, torch.ones_like(tokens, dtype=torch.bool), config, gen(3))
    assert_constant_per_unit_and_distinct(batch.t, units(doc_ids, batch.layout[:, 1]))
    assert len(set(batch.t[0].tolist())) == 2 + 7


def test_batch_per_row_generators_make_noise_depend_on_the_row_only():
    tokens, doc_ids, eligible = small_batch()
    config = SDARConfig(block_size=4, mask_token_id=MASK_ID)
    both = build_sdar_batch(tokens, doc_ids, eligible, config, [gen(5), gen(6)])
    second_alone = build_sdar_batch(tokens[1:], doc_ids[1:], eligible[1:], config, [gen(6)])
    assert torch.equal(both.input_ids[1:], second_alone.input_ids)
    assert torch.equal(both.t[1:], second_alone.t)
    with pytest.raises(ValueError):
        build_sdar_batch(tokens, doc_ids, eligible, config, [gen(5)])


def test_batch_window_not_a_multiple_of_block_size_raises():
    tokens = torch.arange(10).reshape(1, 10)
    doc_ids = doc_rows([10])
    config = SDARConfig(block_size=4, mask_token_id=MASK_ID)
    with pytest.raises(ValueError, match="block size") as info:
        build_sdar_batch(tokens, doc_ids, torch.ones_like(tokens, dtype=torch.bool), config, gen(0))
    assert "10" in str(info.value) and "4" in str(info.value)


# ---------------------------------------------------------------------------------------------------
# rows that draw no masked token: redraw (unbiased weights) against force (the earlier behaviour)


def _weight_per_eligible_token(n: int, rows: int, mode: str, seed: int = 0) -> float:
    """Monte Carlo estimate of E[sum over masked tokens of 1 / mask_prob] / n for rows of n eligible
    tokens: 1 when the loss weights are unbiased."""
    tokens = torch.zeros(rows, n, dtype=torch.long)
    eligible = torch.ones(rows, n, dtype=torch.bool)
    doc_ids = torch.zeros(rows, n, dtype=torch.int32)
    out = apply_noise(tokens, eligible, doc_ids, MASK_ID, gen(seed), empty_rows=mode)
    assert out.masked.any(dim=-1).all()
    return ((out.masked / out.mask_prob).sum() / (rows * n)).item()


@pytest.mark.parametrize("n", [8, 64])
def test_redraw_keeps_the_expected_weight_per_eligible_token_at_one(n):
    eps = 1e-3
    grid = (torch.arange(200_000, dtype=torch.float64) + 0.5) / 200_000
    p = (1 - eps) * grid + eps
    force_expected = 1 + ((1 - p) ** n / p).mean().item() / n  # forcing keeps p: 1.52 at n=8, 1.03 at 64
    redraw = _weight_per_eligible_token(n, 40_000, "redraw")
    force = _weight_per_eligible_token(n, 40_000, "force")
    print(f"n={n}: expected weight per eligible token: redraw {redraw:.3f}, force {force:.3f} "
          f"(force, exact: {force_expected:.3f})")  # fmt: skip
    assert abs(redraw - 1.0) < 0.02
    assert abs(force - force_expected) < 0.05 * force_expected
    if n == 8:
        assert force_expected > 1.5  # what the redraw removes


def test_redraw_weights_are_bounded_and_the_stream_is_data_independent():
    """The reported probability is p / P(row has a masked token): never below p, never above 1; the
    random stream has the same length whatever the data (the next draw agrees)."""
    rows, n = 500, 6
    tokens = torch.zeros(rows, n, dtype=torch.long)
    eligible = torch.rand(rows, n, generator=gen(2)) < 0.5
    doc_ids = torch.zeros(rows, n, dtype=torch.int32)
    g1, g2 = gen(3), gen(3)
    out = apply_noise(tokens, eligible, doc_ids, MASK_ID, g1)
    apply_noise(tokens, torch.ones_like(eligible), doc_ids, MASK_ID, g2)
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))
    p = 1e-3 + (1 - 1e-3) * out.t
    has = eligible.any(-1, keepdim=True)
    assert ((out.mask_prob >= p - 1e-6) | ~has).all() and (out.mask_prob <= 1.0).all()
    assert not (out.masked & ~eligible).any()
    assert (out.masked.any(-1) == has.squeeze(-1)).all()


def test_noise_range_limits_t():
    doc_ids = doc_rows([5, 7, 4], [16])
    t = sample_t(doc_ids, gen(0), t_range=(0.3, 0.8))
    assert ((t >= 0.3) & (t <= 0.8)).all()
    with pytest.raises(ValueError, match="t_min < t_max"):
        sample_t(doc_ids, gen(0), t_range=(0.8, 0.3))


def test_global_document_mask_joins_the_documents_of_a_window_but_not_its_padding():
    """The paper's CPT mask: one document per window (blocks from the window start), padding apart;
    the noise is still drawn per document."""
    from megatron_sdar.config import DocumentMask

    tokens = torch.arange(16).reshape(1, 16) + 10
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3]])  # doc 3: padding
    eligible = doc_ids != 3
    config = SDARConfig(block_size=4, mask_token_id=MASK_ID, document_mask=DocumentMask.GLOBAL)
    batch = build_sdar_batch(tokens, doc_ids, eligible, config, gen(0))
    assert batch.layout[0, 0].tolist() == [0] * 13 + [1] * 3
    assert batch.layout[0, 1].tolist() == [i // 4 for i in range(16)]
    assert_constant_per_unit_and_distinct(batch.t[:, :13], units(doc_ids[:, :13]))
    separate = build_sdar_batch(
        tokens, doc_ids, eligible, SDARConfig(block_size=4, mask_token_id=MASK_ID), gen(0)
    )
    assert separate.layout[0, 0].tolist() == doc_ids[0].tolist()
    assert torch.equal(separate.masked, batch.masked)  # same noise either way
