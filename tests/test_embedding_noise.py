"""Gaussian noise on the mask token's input embedding (``--sdar-mask-embedding-noise-std/-iters``):
only masked positions, the asked-for spread, one draw shared by sequence-parallel shards, training
forwards of the first iterations only, seeds per (iteration, micro-batch, DP rank) that a resumed run
repeats, and the flags' checks. TP=2 with sequence parallelism equals one process in
``tests/test_parallel.py`` (case ``tp2-sequence-parallel-embedding-noise``)."""

from __future__ import annotations

import types

import pytest
import torch

from megatron_sdar.batch import BATCH_FIELDS
from megatron_sdar.embedding_noise import add_mask_embedding_noise, noise_seed
from tests.helpers import tiny_model
from tests.test_ar_loss import MASK, VOCAB, sample_batch
from tests.test_ar_loss import L as SEQ


def test_only_masked_positions_move_by_the_asked_spread():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (4, 512), generator=gen)
    ids[:, ::3] = MASK
    embedded = torch.randn(512, 4, 64, generator=gen)
    out = add_mask_embedding_noise(embedded, ids, MASK, std=0.25, seed=11)
    delta = out - embedded
    masked = (ids.t() == MASK).unsqueeze(-1).expand_as(delta)
    assert torch.count_nonzero(delta[~masked]) == 0
    assert torch.count_nonzero(delta[masked]) == masked.sum()
    assert delta[masked].std().item() == pytest.approx(0.25, rel=0.02)
    assert delta[masked].mean().abs().item() < 0.01
    torch.testing.assert_close(add_mask_embedding_noise(embedded, ids, MASK, 0.25, 11), out, rtol=0, atol=0)
    assert not torch.equal(add_mask_embedding_noise(embedded, ids, MASK, 0.25, 12), out)
    assert add_mask_embedding_noise(embedded, ids, MASK, 0.0, 11) is embedded


def test_shards_take_their_part_of_one_draw():
    """What a sequence-parallel rank adds to its shard is the whole sequence's noise at its
    positions, so the shards concatenated equal the unsplit result; gradients pass unchanged."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (2, 16), generator=gen)
    ids[:, 1::2] = MASK
    embedded = torch.randn(16, 2, 8, generator=gen, requires_grad=True)
    whole = add_mask_embedding_noise(embedded, ids, MASK, 1.0, seed=5)
    shards = [embedded[r * 4 : (r + 1) * 4] for r in range(4)]
    parts = [add_mask_embedding_noise(x, ids, MASK, 1.0, 5, (r, 4)) for r, x in enumerate(shards)]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=0)
    whole.sum().backward()
    torch.testing.assert_close(embedded.grad, torch.ones_like(embedded))
    half = embedded.detach().half()
    assert add_mask_embedding_noise(half, ids, MASK, 1.0, 5).dtype == torch.float16
    with pytest.raises(ValueError, match="not shard 1 of 4"):
        add_mask_embedding_noise(embedded[:8], ids, MASK, 1.0, 5, (1, 4))


def test_seeds_differ_for_every_part():
    seeds = {noise_seed(s, i, m, d) for s in (0, 1234) for i in range(20) for m in range(8) for d in range(4)}
    assert len(seeds) == 2 * 20 * 8 * 4
    assert all(0 <= s < 2**63 for s in seeds)
    assert noise_seed(1, 2, 3, 4) == noise_seed(1, 2, 3, 4)


def test_model_applies_it_in_training_only(megatron_world):
    model = tiny_model(vocab_size=VOCAB, seq_length=SEQ, seed=3)
    batch = sample_batch(seed=4)

    def loss(noise):
        out = model(
            batch.input_ids, batch.position_ids, batch.layout, labels=batch.labels, mask_embedding_noise=noise
        )
        return out[..., 0].sum()

    plain = loss(None)
    assert batch.input_ids.eq(MASK).any()
    noisy = loss((1.0, 7))
    assert not torch.allclose(noisy, plain)
    torch.testing.assert_close(loss((1.0, 7)), noisy, rtol=0, atol=0)
    model.eval()
    torch.testing.assert_close(loss((1.0, 7)), plain, rtol=0, atol=0)


def _step_args(**overrides):
    args = dict(
        sdar_objective="sdar", sdar_output_positions="noised", micro_batch_size=2, seq_length=SEQ,
        sdar_loss_normalizer="eligible", sdar_mask_embedding_noise_std=0.5,
        sdar_mask_embedding_noise_iters=2, seed=1234, curr_iteration=0,
    )  # fmt: skip
    args.update(overrides)
    return types.SimpleNamespace(**args)


def test_forward_step_seeds_per_micro_batch_and_stops_after_the_iterations(megatron_world, monkeypatch):
    """The forward step passes ``(std, seed)`` in training forwards while fewer than N iterations are
    done, a new seed per micro-batch, none in evaluation; a new step object (a resumed run) starting
    at iteration 1 draws what the first did at iteration 1."""
    import megatron.training.global_vars as global_vars
    from megatron.core.timers import Timers

    from megatron_sdar.training.step import SDARForwardStep

    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, *args, **kwargs):
            seen.append(kwargs.get("mask_embedding_noise"))
            return torch.zeros(2, SEQ, 2)

    model = Recorder()
    batch = sample_batch(seed=8)
    fields = {f.name: getattr(batch, f.name) for f in BATCH_FIELDS}
    monkeypatch.setattr(global_vars, "_GLOBAL_TIMERS", Timers(0, "minmax"))

    def steps(step, iterations, micro_batches=2, training=True):
        model.train(training)
        for iteration in iterations:
            monkeypatch.setattr(global_vars, "_GLOBAL_ARGS", _step_args(curr_iteration=iteration))
            for _ in range(micro_batches):
                step(iter([fields]), model)

    steps(SDARForwardStep(), [0, 1, 2, 3])
    first = list(seen)
    assert [s is not None for s in first] == [True] * 4 + [False] * 4
    assert all(s[0] == 0.5 for s in first[:4])
    assert len({s[1] for s in first[:4]}) == 4
    seen.clear()
    steps(SDARForwardStep(), [1, 2])  # resumed after one iteration
    assert seen == first[2:6]
    seen.clear()
    steps(SDARForwardStep(), [0], training=False)
    assert seen == [None, None]


def test_settings(monkeypatch):
    from megatron_sdar.training.arguments import validate_sdar_args
    from tests.test_training import parse

    good = ["--sdar-mask-embedding-noise-std", "0.1", "--sdar-mask-embedding-noise-iters", "50"]
    validate_sdar_args(parse(good, monkeypatch), vocab_size=128)
    for flags, message in (
        (["--sdar-mask-embedding-noise-std", "0.1"], "which is 0: pass the number of iterations"),
        (["--sdar-mask-embedding-noise-iters", "10"], "pass the noise's standard deviation"),
        (["--sdar-mask-embedding-noise-std", "-1", "--sdar-mask-embedding-noise-iters", "5"], "must be >= 0"),
        (
            ["--sdar-mask-embedding-noise-std", "0.1", "--sdar-mask-embedding-noise-iters", "5",
             "--sdar-objective", "ar"],
            "SDAR objective only",
        ),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            validate_sdar_args(parse(flags, monkeypatch), vocab_size=128)
