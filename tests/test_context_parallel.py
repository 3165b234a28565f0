"""Context parallelism's pieces on one process: the zig-zag chunks of both halves, the order that puts
gathered keys back in sequence order, the slicing of a micro-batch (re-assembled it is the whole one),
the balance of the SDAR mask's work across ranks, a query-restricted mask equal to the rows of the
whole one, and the settings' checks. Equality with CP=1 through Megatron's schedule (CPT, SFT
positions, TP+SP, PP, MoE EP) is in ``tests/test_parallel.py`` (``cp2*`` cases) and through Megatron's
training loop in ``tests/test_train_loop.py``."""

from __future__ import annotations

import pytest
import torch

from megatron_sdar.batch import BATCH_FIELDS, build_sdar_batch
from megatron_sdar.config import SDARConfig
from megatron_sdar.context_parallel import (
    block_size_problem,
    clean_positions,
    cp_plan,
    cp_problems,
    sequence_index,
    slice_micro_batch,
)
from megatron_sdar.masks import dense_sdar_mask, document_ids_from_eod, make_layout


def test_each_rank_holds_chunk_r_and_its_mirror_of_both_halves():
    assert clean_positions(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert clean_positions(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert sequence_index(8, 2, 1).tolist() == [2, 3, 4, 5, 10, 11, 12, 13]
    for cp in (1, 2, 4):
        held = torch.cat([clean_positions(64, cp, r) for r in range(cp)])
        assert sorted(held.tolist()) == list(range(64))
    with pytest.raises(ValueError, match="multiple of 8"):
        clean_positions(20, 4, 0)


def test_the_plan_gathers_exactly_the_keys_by_position():
    """Simulated gathers (every rank's rows stacked rank-major): the plan's keys are its own noised
    tokens, the halo of noised positions within B-1 of its chunks held elsewhere (each once), and every
    clean position in order; the gathered edges hold the halo's rows."""
    seq, cp, halo = 48, 3, 3
    plans = [cp_plan(seq, cp, r, halo) for r in range(cp)]
    index = [sequence_index(seq, cp, r) for r in range(cp)]  # each rank's tokens: global ids
    edges = torch.cat([index[r][: seq // cp][plans[r].edge_rows] for r in range(cp)])
    clean = torch.cat([index[r][seq // cp :] for r in range(cp)])
    for rank, plan in enumerate(plans):
        own = clean_positions(seq, cp, rank)
        keys = torch.cat([own, edges[plan.halo_rows], clean[plan.clean_order]])
        assert torch.equal(keys, plan.key_index)
        assert torch.equal(plan.query_index, index[rank])
        halo_positions = set(edges[plan.halo_rows].tolist())
        near = {p for p in range(seq) if min(abs(p - q) for q in own.tolist()) <= halo}
        assert halo_positions == near - set(own.tolist())
        assert len(set(plan.key_index.tolist())) == plan.key_index.numel()  # no key twice
        assert plan.key_index.numel() == seq // cp + len(halo_positions) + seq  # not the whole 2L
    with pytest.raises(ValueError, match="shorter than the block size"):
        cp_plan(16, 4, 0, 2)


@pytest.mark.parametrize("counting", ["document", "window"])
def test_no_query_sees_a_key_outside_its_plan(counting):
    """Brute force over packed windows with documents and blocks crossing chunk boundaries, rows
    of different block sizes (a schedule's) up to the bound: every key the whole mask lets a rank's
    query see is among the plan's keys, so restricting the keys loses nothing."""
    gen = torch.Generator().manual_seed(5)
    seq = 96
    for cp, sizes in ((2, (1, 2, 4, 8)), (4, (4, 8)), (3, (8,))):
        halo = max(sizes) - 1
        tokens = torch.randint(2, 90, (len(sizes), seq), generator=gen)
        tokens[torch.rand(tokens.shape, generator=gen) < 0.07] = 1
        doc_ids = document_ids_from_eod(tokens, 1)
        layout = torch.cat([make_layout(doc_ids[i : i + 1], b, counting) for i, b in enumerate(sizes)])
        assert block_size_problem(layout, max(sizes)) is None
        for clean in ("block_causal", "causal"):
            whole = dense_sdar_mask(layout, clean)
            for rank in range(cp):
                plan = cp_plan(seq, cp, rank, halo)
                seen = whole[:, :, plan.query_index]
                outside = torch.ones(2 * seq, dtype=torch.bool)
                outside[plan.key_index] = False
                assert not seen[..., outside].any(), (cp, rank, clean)
        # a plan built for smaller blocks would miss keys: the reader refuses such a batch
        assert "longer than the largest block size" in block_size_problem(layout, max(sizes) // 2)


def _batch(seed: int = 0, rows: int = 2, seq: int = 32):
    sdar = SDARConfig(block_size=4, mask_token_id=99)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, 98, (rows, seq), generator=gen)
    tokens[:, 6] = tokens[:, 19] = 1  # documents that cross chunk boundaries
    doc_ids = document_ids_from_eod(tokens, 1)
    eligible = torch.rand((rows, seq), generator=gen) < 0.9
    return build_sdar_batch(tokens, doc_ids, eligible, sdar, gen)


def test_sliced_micro_batches_reassemble_to_the_whole_one():
    batch = _batch()
    whole = {f.name: getattr(batch, f.name) for f in BATCH_FIELDS}
    seq = batch.labels.shape[-1]
    for cp in (2, 4):
        rebuilt = {name: torch.zeros_like(value) for name, value in whole.items()}
        for rank in range(cp):
            part = slice_micro_batch(whole, cp, rank)
            assert part["input_ids"].shape[-1] == 2 * seq // cp and part["labels"].shape[-1] == seq // cp
            assert part["layout"] is whole["layout"] and part["position_ids"] is whole["position_ids"]
            rebuilt["input_ids"][:, sequence_index(seq, cp, rank)] = part["input_ids"]
            for name in ("labels", "eligible", "masked", "mask_prob", "t"):
                rebuilt[name][:, clean_positions(seq, cp, rank)] = part[name]
        for name in ("input_ids", "labels", "eligible", "masked", "mask_prob", "t"):
            assert torch.equal(rebuilt[name], whole[name]), (cp, name)


def test_the_zig_zag_balances_the_sdar_mask_work():
    """Allowed (query, key) pairs per rank for one document of 256 tokens at B=4: equal within 1%
    with the zig-zag chunks; contiguous halves would give one rank about three times the other's."""
    layout = torch.stack(
        [torch.zeros(1, 256, dtype=torch.int32), torch.arange(256).div(4, rounding_mode="floor")[None].int()],
        1,
    )
    mask = dense_sdar_mask(layout, "block_causal")[0, 0]
    for cp in (2, 4):
        work = [int(mask[sequence_index(256, cp, r)].sum()) for r in range(cp)]
        assert max(work) / min(work) < 1.01, work
    contiguous = [
        int(mask[torch.cat([torch.arange(a, a + 128), torch.arange(256 + a, 256 + a + 128)])].sum())
        for a in (0, 128)
    ]
    assert max(contiguous) / min(contiguous) > 2.5


def test_restricted_masks_are_the_rows_and_columns_of_the_whole_mask():
    from megatron_sdar.attention.cache import SDARMaskCache
    from megatron_sdar.attention.flex import build_block_mask

    batch = _batch(seed=3)
    layout = batch.layout
    whole = dense_sdar_mask(layout, "block_causal")
    cache = SDARMaskCache()
    for rank in range(2):
        plan = cp_plan(32, 2, rank, 3)
        rows, cols = plan.query_index, plan.key_index
        got = cache.get(layout, "block_causal", "sdpa", indices=((rank, 2, 3), rows, cols))
        assert torch.equal(got, whole[:, :, rows][..., cols])
        block_mask = build_block_mask(layout, "block_causal", block=16, query_index=rows, key_index=cols)
        assert block_mask.shape[-2:] == (rows.numel(), cols.numel())
        dense = block_mask.to_dense()  # tiles that may hold an allowed pair
        padded = torch.zeros(2, 1, 32, -(-cols.numel() // 16) * 16, dtype=torch.bool)
        padded[..., : cols.numel()] = whole[:, :, rows][..., cols]
        tiles = padded.unflatten(2, (2, 16)).unflatten(-1, (-1, 16)).any(-1).any(-2)
        assert torch.equal(dense.bool(), tiles)
    plan = cp_plan(32, 2, 0, 3)
    cache.get(layout, "block_causal", "sdpa", indices=((0, 2, 3), plan.query_index, plan.key_index))
    assert cache.builds == 2  # one per rank key; the third call found rank 0's


def test_settings(monkeypatch):
    from megatron_sdar.training.arguments import validate_sdar_args
    from tests.test_training import parse

    assert cp_problems(64, 4) == [] and cp_problems(60, 1) == []
    assert "multiple of 8" in cp_problems(60, 4)[0]
    assert "shorter than the block size 16" in cp_problems(64, 4, 16)[0]
    validate_sdar_args(parse(["--context-parallel-size", "2"], monkeypatch), vocab_size=128)
    for flags, message in (
        (["--context-parallel-size", "2", "--sdar-objective", "ar"], "AR baseline"),
        (["--context-parallel-size", "2", "--sdar-attention-backend", "split"], "split does not support"),
        (["--context-parallel-size", "2", "--cp-comm-type", "a2a"], "all-gathers keys and values"),
        (["--context-parallel-size", "8", "--sdar-block-size", "8"], "shorter than the block size 8"),
        (["--context-parallel-size", "2", "--hybrid-context-parallel"], "--hybrid-context-parallel balances"),
    ):
        with pytest.raises(ValueError, match=message):
            validate_sdar_args(parse(flags, monkeypatch), vocab_size=128)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_flex_attention_of_a_ranks_queries_equals_the_dense_rows():
    """On CUDA, what a context-parallel rank computes: its queries against its plan's keys with the
    compiled, restricted FlexAttention block mask, forward and backward, equal SDPA with those rows
    and columns of the dense mask (bf16, packed documents crossing chunk and tile boundaries)."""
    import torch.nn.functional as F

    from megatron_sdar.attention.flex import build_block_mask, compiled_flex_attention
    from tests.test_gpu_attention import packed_layout

    layout = packed_layout()
    seq = layout.shape[-1]
    dense = dense_sdar_mask(layout, "block_causal")
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 8, 2 * seq, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(2, 4, 2 * seq, 64, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in "kv")
    for cp in (2, 4):
        for rank in range(cp):
            plan = cp_plan(seq, cp, rank, 3, "cuda")
            rows, cols = plan.query_index, plan.key_index
            outs, grads = [], []
            for use_flex in (True, False):
                qr = q[:, :, rows].detach().clone().requires_grad_()
                kk = k[:, :, cols].detach().clone().requires_grad_()
                vv = v[:, :, cols].detach().clone().requires_grad_()
                if use_flex:
                    mask = build_block_mask(
                        layout, "block_causal", compile=True, query_index=rows, key_index=cols
                    )
                    out = compiled_flex_attention()(qr, kk, vv, block_mask=mask, enable_gqa=True)
                else:
                    out = F.scaled_dot_product_attention(
                        qr, kk, vv, attn_mask=dense[:, :, rows][..., cols], enable_gqa=True
                    )
                out.float().square().sum().backward()
                outs.append(out.float())
                grads.append([t.grad.float() for t in (qr, kk, vv)])
            torch.testing.assert_close(outs[0], outs[1], rtol=2e-2, atol=2e-2)
            for a, b in zip(*grads):
                torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)
