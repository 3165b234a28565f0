"""The FLOP count: attention entries against the dense mask, and the matrix work of a real forward."""

from __future__ import annotations

import pytest
import torch

from megatron_sdar.masks import (
    BlockCounting,
    CleanAttention,
    dense_sdar_mask,
    document_ids_from_lengths,
    make_layout,
)
from megatron_sdar.training.flops import (
    FORWARD_BACKWARD,
    ModelShape,
    ar_step_flops,
    causal_attention_entries,
    sdar_attention_entries,
    sdar_step_flops,
)


@pytest.mark.parametrize("clean", list(CleanAttention))
@pytest.mark.parametrize("counting", list(BlockCounting))
@pytest.mark.parametrize("block_size", [1, 3, 4, 16])
def test_sdar_entries_equal_dense_mask(clean, counting, block_size):
    rows = [[48], [5, 17, 26], [1, 1, 30, 16], [13, 35]]
    doc_ids = torch.stack([document_ids_from_lengths(r) for r in rows])
    layout = make_layout(doc_ids, block_size, counting)
    assert sdar_attention_entries(layout, clean) == int(dense_sdar_mask(layout, clean).sum())


def test_causal_entries():
    mask = torch.ones(10, 10, dtype=torch.bool).tril()
    assert causal_attention_entries(3, 10) == 3 * int(mask.sum())


def test_sdar_mask_is_about_half_of_causal_over_2l():
    seq, block = 4096, 4
    layout = make_layout(torch.zeros(1, seq, dtype=torch.int32), block, "document")
    ratio = sdar_attention_entries(layout, "block_causal") / causal_attention_entries(1, 2 * seq)
    assert ratio == pytest.approx(0.5, abs=0.01)


def test_body_flops_match_linear_layers():
    """Count the multiply-adds of every linear layer of a small MoE-free layer stack directly."""
    shape = ModelShape(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
        ffn_hidden_size=96, vocab_size=100,
    )  # fmt: skip
    h, q, kv, f = 64, 4 * 16, 2 * 16, 96
    weights = [(h, q + 2 * kv), (q, h), (h, 2 * f), (f, h)]
    assert shape.body_flops_per_token() == 2 * 2 * sum(a * b for a, b in weights)
    assert shape.attention_flops_per_entry() == 2 * 2 * 2 * 4 * 16
    layout = make_layout(torch.zeros(2, 8, dtype=torch.int32), 4, "document")
    entries = sdar_attention_entries(layout, "block_causal")
    expected = 2 * 16 * shape.body_flops_per_token() + entries * shape.attention_flops_per_entry()
    expected += 2 * 8 * 2 * h * 100
    assert sdar_step_flops(shape, layout, "block_causal") == FORWARD_BACKWARD * expected
    # the output layer on 5 masked positions only
    fewer = expected - (2 * 8 - 5) * 2 * h * 100
    assert sdar_step_flops(shape, layout, "block_causal", output_tokens=5) == FORWARD_BACKWARD * fewer
    ar = 2 * 8 * (shape.body_flops_per_token() + 2 * h * 100) + 2 * 36 * shape.attention_flops_per_entry()
    assert ar_step_flops(shape, 2, 8) == FORWARD_BACKWARD * ar


def test_moe_counts_routed_experts_only():
    dense = ModelShape(1, 32, 4, 4, 8, 64, 10)
    moe = ModelShape(1, 32, 4, 4, 8, 999, 10, num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=64)
    # two experts of the dense MLP's size, plus the router's [h, experts] product
    mlp = 2 * 3 * 32 * 64
    assert moe.body_flops_per_token() - dense.body_flops_per_token() == mlp + 2 * 32 * 8
