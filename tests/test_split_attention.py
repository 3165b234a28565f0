"""The split SDAR attention (variable-length causal part + local band) against the dense mask.

The plan is checked structurally (its two parts are disjoint and together are exactly the SDAR
mask) and numerically (outputs and gradients equal dense-mask attention), for packed documents,
both block countings, both clean-half variants, blocks cut by documents, GQA and several rows.
The CPU path runs a dense reference of the flash kernel's variable-length causal semantics
(bottom-right aligned); tests/test_gpu_attention.py checks the CUDA kernel against the same mask.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType

from megatron_sdar.attention.cache import SDARMaskCache
from megatron_sdar.attention.core import SDARCoreAttention
from megatron_sdar.attention.split import (
    _bottom_right_causal,
    _segments,
    band_mask_mod,
    build_split_plan,
    split_sdar_attention,
)
from megatron_sdar.masks import (
    BlockCounting,
    CleanAttention,
    dense_sdar_mask,
    document_ids_from_lengths,
    make_layout,
)

CASES = {
    "one-doc": ([[16]], 4, "document"),
    "docs-document": ([[5, 3, 1, 9]], 4, "document"),
    "docs-window": ([[5, 3, 1, 9]], 4, "window"),
    "ragged-length": ([[18]], 4, "window"),
    "block-1": ([[3, 7]], 1, "document"),
    "short-docs-block-8": ([[2, 12, 3, 1]], 8, "document"),
    "two-rows": ([[6, 10], [1, 4, 11]], 4, "document"),
    "two-rows-window": ([[7, 9], [16]], 4, "window"),
}


def layout_for(lengths: list[list[int]], block: int, counting: str) -> torch.Tensor:
    docs = torch.stack([document_ids_from_lengths(row) for row in lengths])
    return make_layout(docs, block, BlockCounting(counting))


def plan_as_dense(plan) -> tuple[torch.Tensor, torch.Tensor]:
    """The main and local parts as ``[b * 2L, b * 2L]`` boolean matrices over all rows."""
    b, seq = plan.batch, plan.seq_len
    n = b * 2 * seq
    main = torch.zeros(n, n, dtype=torch.bool)
    rows = plan.key_rows
    for (q0, q1), (k0, k1) in _segments(plan):
        nz = _bottom_right_causal(q1 - q0, k1 - k0).nonzero()
        main[q0 + nz[:, 0], rows[k0 + nz[:, 1]]] = True
    local = torch.zeros(n, n, dtype=torch.bool)
    r, t, x, i, y, w = plan.local_mask.nonzero().unbind(1)
    span = plan.span
    q_row = r * 2 * seq + x * seq + t * span + i
    k_row = r * 2 * seq + y * seq + t * span - span + w
    local[q_row, k_row] = True
    return main, local


def reference_dense(layout: torch.Tensor, clean: CleanAttention) -> torch.Tensor:
    b, _, seq = layout.shape
    per_row = dense_sdar_mask(layout, clean)[:, 0]
    return torch.block_diag(*per_row) if b > 1 else per_row[0]


@pytest.mark.parametrize("clean", list(CleanAttention))
@pytest.mark.parametrize("case", list(CASES))
def test_plan_parts_are_disjoint_and_make_the_sdar_mask(case, clean):
    layout = layout_for(*CASES[case])
    plan = build_split_plan(layout, clean)
    main, local = plan_as_dense(plan)
    assert not (main & local).any()
    assert torch.equal(main | local, reference_dense(layout, clean))
    # the local part stays within S - 1 positions of each query
    _, _, _, i, _, w = plan.local_mask.nonzero().unbind(1)
    assert ((w - plan.span - i).abs() < plan.span).all()


@pytest.mark.parametrize("clean", list(CleanAttention))
@pytest.mark.parametrize("case", ["docs-document", "docs-window", "two-rows", "short-docs-block-8"])
def test_band_mask_mod_is_the_plans_local_part(case, clean):
    """The FlexAttention band used on CUDA allows exactly the plan's local pairs."""
    layout = layout_for(*CASES[case])
    plan = build_split_plan(layout, clean)
    b, _, seq = layout.shape
    idx = torch.arange(2 * seq)
    mod = band_mask_mod(layout, clean, plan.span)
    band = mod(torch.arange(b)[:, None, None], 0, idx[None, :, None], idx[None, None, :])
    _, local = plan_as_dense(plan)
    want = local.view(b, 2 * seq, b, 2 * seq).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    assert torch.equal(band, want)


def dense_attention(q, k, v, layout, clean, scale):
    mask = dense_sdar_mask(layout, clean)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )  # fmt: skip
    return out.transpose(1, 2)


@pytest.mark.parametrize("heads", [(4, 2), (2, 2)])
@pytest.mark.parametrize("clean", list(CleanAttention))
@pytest.mark.parametrize("case", list(CASES))
def test_split_attention_equals_dense_mask_attention(case, clean, heads):
    torch.manual_seed(0)
    layout = layout_for(*CASES[case])
    b, _, seq = layout.shape
    h, hk = heads
    q = torch.randn(b, 2 * seq, h, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, 2 * seq, hk, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, 2 * seq, hk, 8, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(b, 2 * seq, h, 8, dtype=torch.float64)
    scale = 0.3
    got = split_sdar_attention(q, k, v, build_split_plan(layout, clean), scale)
    grads = torch.autograd.grad(got, (q, k, v), dout)
    want = dense_attention(q, k, v, layout, clean, scale)
    want_grads = torch.autograd.grad(want, (q, k, v), dout)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


def test_core_attention_split_backend_matches_sdpa_backend():
    """Megatron's contract ([s, b, h, d] in, [s, b, h * d] out), fp32, two rows, GQA."""
    from tests.test_attention_modules import config

    torch.manual_seed(0)
    layout = layout_for([[10, 6], [3, 13]], 4, "document")
    seq = 2 * layout.shape[-1]
    q = torch.randn(seq, 2, 4, 16, requires_grad=True)
    k = torch.randn(seq, 2, 2, 16, requires_grad=True)
    v = torch.randn(seq, 2, 2, 16, requires_grad=True)
    results = []
    for backend in ("split", "sdpa"):
        module = SDARCoreAttention(config(), 1, AttnMaskType.arbitrary, "self", backend=backend)
        out = module(q, k, v, layout)
        results.append((out, torch.autograd.grad(out.square().sum(), (q, k, v))))
    (out_split, g_split), (out_sdpa, g_sdpa) = results
    assert out_split.shape == (seq, 2, 64)
    torch.testing.assert_close(out_split, out_sdpa, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_split, g_sdpa, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_plan_is_built_once_per_layout_and_shared_by_layers():
    from tests.test_attention_modules import config

    cache = SDARMaskCache()
    layout = layout_for([[8, 8]], 4, "document")
    layers = [
        SDARCoreAttention(config(), n, AttnMaskType.arbitrary, "self", backend="split", mask_cache=cache)
        for n in (1, 2, 3)
    ]
    x = torch.randn(32, 1, 4, 16)
    for layer in layers:
        layer(x, x[:, :, :2], x[:, :, :2], layout)
    assert cache.builds == 1


@pytest.mark.parametrize("case", ["docs-document", "two-rows-window"])
def test_plan_from_the_host_copy_never_reads_the_layout(case):
    """With the loader's host copy the plan needs the device layout only for device-side work:
    a layout on the meta device (unreadable) gives the same segments as the real one."""
    layout = layout_for(*CASES[case])
    reference = build_split_plan(layout, "block_causal")
    plan = build_split_plan(layout.to("meta"), "block_causal", host=layout.clone())
    assert plan.cu_q_host == reference.cu_q_host and plan.cu_k_host == reference.cu_k_host
    assert (plan.span, plan.max_q, plan.max_k) == (reference.span, reference.max_q, reference.max_k)
    assert plan.key_rows.is_meta and plan.local_mask.shape == reference.local_mask.shape
    with pytest.raises(ValueError, match="does not match the layout"):
        build_split_plan(layout, "block_causal", host=layout[:, :, :-1].clone())


def test_host_copies_follow_the_layout_through_cache_and_model(monkeypatch, megatron_world):
    """The training loop hands the model the loader's copy; the model records it for the layout it
    builds (with positions) and the split plan is built from it. An in-place change forgets it."""
    import megatron_sdar.attention.cache as attention
    from megatron_sdar.batch import build_sdar_batch
    from megatron_sdar.config import SDARConfig
    from tests.helpers import tiny_model

    cache = SDARMaskCache()
    layout = layout_for([[6, 10]], 4, "document")
    host = layout.clone()
    cache.set_host_copy(layout, host)
    assert cache.host_copy(layout) is host and cache.host_copy(layout.clone()) is None
    with pytest.raises(ValueError, match="does not match"):
        cache.set_host_copy(layout, host[:, :, :4])
    small = SDARMaskCache(max_entries=2)  # least recently used copies go first
    layouts = [layout_for([[8]], 4, "document") for _ in range(3)]
    small.set_host_copy(layouts[0], host[:, :, :8].clone())
    small.set_host_copy(layouts[1], host[:, :, :8].clone())
    assert small.host_copy(layouts[0]) is not None
    small.set_host_copy(layouts[2], host[:, :, :8].clone())
    assert small.host_copy(layouts[1]) is None and small.host_copy(layouts[0]) is not None

    seen = []

    def spy(layout, clean, band="auto", host=None):
        seen.append(host)
        return build_split_plan(layout, clean, band, host)

    monkeypatch.setattr(attention, "build_split_plan", spy)
    sdar = SDARConfig(block_size=4, mask_token_id=63, attention_backend="split")
    model = tiny_model(sdar, vocab_size=64, seq_length=16)
    tokens = torch.randint(0, 63, (1, 16), generator=torch.Generator().manual_seed(0))
    doc_ids = document_ids_from_lengths([6, 10]).unsqueeze(0)
    batch = build_sdar_batch(tokens, doc_ids, torch.ones_like(tokens, dtype=torch.bool), sdar)
    model(batch.input_ids, batch.position_ids, batch.layout, labels=batch.labels, layout_host=host)
    assert len(seen) == 1 and seen[0] is host
    batch.layout[:, 1, -1] += 0  # an in-place op bumps the version: the record no longer applies
    model(batch.input_ids, batch.position_ids, batch.layout, labels=batch.labels)
    assert len(seen) == 2 and seen[1] is None


def test_plan_refuses_layouts_it_cannot_split():
    split_doc = torch.tensor([[[0, 0, 1, 1, 0, 0, 2, 2], [0, 0, 0, 0, 0, 0, 0, 0]]], dtype=torch.int32)
    with pytest.raises(ValueError, match="document id in more than one span"):
        build_split_plan(split_doc, "block_causal")
    backwards = torch.tensor([[[0] * 8, [0, 0, 1, 1, 0, 0, 1, 1]]], dtype=torch.int32)
    with pytest.raises(ValueError, match="block indices decrease"):
        build_split_plan(backwards, "block_causal")


def test_plan_refuses_unknown_or_unavailable_band_kernels():
    layout = layout_for([[8]], 4, "document")
    with pytest.raises(ValueError, match="band kernel must be one of"):
        build_split_plan(layout, "block_causal", band="triton")
    with pytest.raises(ValueError, match="needs CUDA"):
        build_split_plan(layout, "block_causal", band="flex")
    assert build_split_plan(layout, "block_causal", band="tiles").band_block_mask is None


def test_split_attention_refuses_mismatched_inputs():
    layout = layout_for([[8]], 4, "document")
    plan = build_split_plan(layout, "block_causal")
    q = torch.randn(1, 12, 2, 8)
    with pytest.raises(ValueError, match="do not match the layout"):
        split_sdar_attention(q, q, q, plan, 1.0)
    q = torch.randn(1, 16, 3, 8)
    with pytest.raises(ValueError, match="not a multiple"):
        split_sdar_attention(q, q[:, :, :2], q[:, :, :2], plan, 1.0)


def test_model_loss_and_gradients_equal_with_split_and_sdpa(megatron_world):
    """The whole SDAR model (two layers, GQA, packed documents, two rows): the split back end gives
    the dense-mask back end's loss and every parameter gradient."""
    from megatron_sdar.batch import build_sdar_batch
    from megatron_sdar.config import SDARConfig
    from tests.helpers import tiny_model

    vocab, seq = 64, 32
    tokens = torch.randint(0, vocab - 1, (2, seq), generator=torch.Generator().manual_seed(1))
    doc_ids = torch.stack([document_ids_from_lengths([13, 19]), document_ids_from_lengths([5, 2, 25])])
    results = []
    for backend in ("sdpa", "split"):
        sdar = SDARConfig(block_size=4, mask_token_id=vocab - 1, attention_backend=backend)
        model = tiny_model(sdar, vocab_size=vocab, seq_length=seq)
        batch = build_sdar_batch(
            tokens, doc_ids, torch.ones_like(tokens, dtype=torch.bool), sdar, torch.Generator().manual_seed(0)
        )
        out = model(batch.input_ids, batch.position_ids, batch.layout, labels=batch.labels)
        loss = out[..., 0].mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None,
    reason="torch.compile on CPU needs a C++ compiler",
)
def test_compiled_merge_and_backward_pieces_equal_eager():
    """The elementwise merge and backward pieces, compiled as they are on CUDA, give the eager
    results (checked here with the CPU compiler)."""
    from megatron_sdar.attention.split import _add_grads, _band_output_grads, _merge

    gen = torch.Generator().manual_seed(0)
    n, h, d = 24, 4, 8

    def rand(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=gen).to(dtype)

    lse_main = torch.randn(n, h, generator=gen)
    lse_main[:5] = float("-inf")  # rows whose keys are all in the band
    merge_args = (rand(n, h, d), lse_main, rand(n, h, d), torch.randn(n, h, generator=gen))
    out, lse = _merge.eager(*merge_args)
    grads_args = (rand(n, h, d), out, rand(n, h, d), torch.randn(n, h, generator=gen), lse)
    add_args = (rand(n, h, d), rand(n, 2, d, dtype=torch.float32), rand(n, 2, d, dtype=torch.float32),
                rand(n, h, d), rand(n, 2, d), rand(n, 2, d))  # fmt: skip
    for fn, args in ((_merge, merge_args), (_band_output_grads, grads_args), (_add_grads, add_args)):
        expected = fn.eager(*args)
        got = torch.compile(fn.eager, dynamic=False)(*args)
        for e, g in zip(expected, got, strict=True):
            assert e.dtype == g.dtype and torch.isfinite(g).all()
            torch.testing.assert_close(g.float(), e.float(), atol=1e-2, rtol=1e-2)
