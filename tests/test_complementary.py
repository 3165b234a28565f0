"""Complementary masking: each window twice in a micro-batch, the second copy masking exactly the
eligible tokens the first left clean, each copy's 1/p weights unbiased on their own, and the data
throughput counting each window once."""

from __future__ import annotations

import pytest
import torch

from megatron_sdar.batch import build_sdar_batch
from megatron_sdar.config import SDARConfig
from megatron_sdar.noise import complementary_t_max
from megatron_sdar.training.datasets import SDARSampleDataset

MASK = 99


def _window(n: int = 24, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 90, (n,), generator=g)
    doc_ids = torch.tensor([0] * 10 + [1] * (n - 10))
    eligible = torch.ones(n, dtype=torch.bool)
    eligible[:3] = False  # a prompt that is never masked
    return {"tokens": tokens, "doc_ids": doc_ids, "eligible": eligible}


def test_pairs_supervise_every_eligible_token_exactly_once():
    config = SDARConfig(block_size=4, mask_token_id=MASK, complementary_masks=True)
    windows = [_window(seed=s) for s in range(5)]
    dataset = SDARSampleDataset(windows, config, seed=3, split="train")
    assert len(dataset) == 2 * len(windows)
    for k, window in enumerate(windows):
        first, second = dataset[2 * k], dataset[2 * k + 1]
        assert torch.equal(first["labels"], window["tokens"]) and torch.equal(
            second["labels"], window["tokens"]
        )
        assert not (first["masked"] & second["masked"]).any()
        assert torch.equal(first["masked"] | second["masked"], window["eligible"])
        torch.testing.assert_close(second["mask_prob"], (1 - first["mask_prob"]).clamp_min(1e-6))
        x_t = torch.where(second["masked"], MASK, window["tokens"])
        assert torch.equal(second["input_ids"][: len(x_t)], x_t)
    plain = SDARSampleDataset(windows, SDARConfig(block_size=4, mask_token_id=MASK), seed=3, split="train")
    assert len(plain) == len(windows)


@pytest.mark.parametrize("copy", [0, 1])
def test_each_copy_weights_are_unbiased(copy):
    """E[sum over masked tokens of 1 / mask_prob] per eligible token is one for each copy."""
    rows, n = 20_000, 8
    config = SDARConfig(block_size=4, mask_token_id=MASK, complementary_masks=True)
    tokens = torch.zeros(rows, n, dtype=torch.long)
    eligible = torch.ones(rows, n, dtype=torch.bool)
    doc_ids = torch.zeros(rows, n, dtype=torch.int64)
    batch = build_sdar_batch(
        tokens, doc_ids, eligible, config, torch.Generator().manual_seed(1), complementary=bool(copy)
    )
    weight = ((batch.masked / batch.mask_prob).sum() / (rows * n)).item()
    assert abs(weight - 1.0) < 0.03, weight
    p = 1e-3 + (1 - 1e-3) * batch.t
    assert (p <= 1 - 1e-3 + 1e-6).all()  # t is capped so both copies keep p >= eps
    assert complementary_t_max(1e-3) < 1.0 and complementary_t_max(0.0) == 1.0


def test_settings_need_an_even_micro_batch(monkeypatch):
    from megatron_sdar.training.arguments import SettingsError, sdar_config_from_args, validate_sdar_args
    from tests.test_training import parse

    args = parse(
        ["--sdar-complementary-masks", "--micro-batch-size", "2", "--global-batch-size", "4"], monkeypatch
    )
    assert sdar_config_from_args(args).complementary_masks
    validate_sdar_args(args, vocab_size=128)
    odd = parse(
        ["--sdar-complementary-masks", "--micro-batch-size", "3", "--global-batch-size", "3"], monkeypatch
    )
    with pytest.raises(SettingsError, match="must be even"):
        validate_sdar_args(odd, vocab_size=128)


def test_data_throughput_counts_each_window_once(megatron_world, monkeypatch):
    import types

    import megatron.training.global_vars as global_vars
    from megatron.core.timers import Timers

    from megatron_sdar.batch import BATCH_FIELDS
    from megatron_sdar.training.step import SDARForwardStep
    from tests.helpers import tiny_model

    config = SDARConfig(block_size=4, mask_token_id=MASK, complementary_masks=True)
    windows = [_window(seed=s) for s in range(1)]
    rows = [SDARSampleDataset(windows, config, seed=0, split="train")[i] for i in range(2)]
    batch = {f.name: torch.stack([r[f.name] for r in rows]) for f in BATCH_FIELDS}
    model = tiny_model(config, vocab_size=128, seq_length=24).eval()
    monkeypatch.setattr(global_vars, "_GLOBAL_TIMERS", Timers(0, "minmax"))
    counted = {}
    for flag in (False, True):
        args = types.SimpleNamespace(
            sdar_objective="sdar", sdar_output_positions="noised", sdar_ar_loss_weight=0.0,
            micro_batch_size=2, seq_length=24, sdar_loss_normalizer="eligible", sdar_complementary_masks=flag,
        )  # fmt: skip
        monkeypatch.setattr(global_vars, "_GLOBAL_ARGS", args)
        step = SDARForwardStep()
        seen: list[int] = []

        def report(tokens, *a, _seen=seen, _real=step.meter.report, **k):
            _seen.append(tokens)
            return _real(tokens, *a, **k)

        step.meter.report = report
        step(iter([batch]), model)
        counted[flag] = seen[0]
    assert counted == {False: 48, True: 24}
