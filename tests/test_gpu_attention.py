"""GPU: FlexAttention, the split back end (variable-length flash attention plus a local band) and
dense-mask SDPA give the same SDAR attention (forward and backward, bf16) on packed multi-document
windows, and one mask serves every layer of a micro-batch."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

HEADS, GROUPS, HEAD_DIM = 8, 4, 64


def core_attention(clean: str, backend: str, mask_cache=None, layer_number: int = 1):
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_sdar.attention.core import SDARCoreAttention
    from megatron_sdar.model.base import qwen3_transformer_config

    config = qwen3_transformer_config(
        num_layers=4, hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, num_query_groups=GROUPS,
        kv_channels=HEAD_DIM,
    )  # fmt: skip
    return SDARCoreAttention(
        config, layer_number, AttnMaskType.arbitrary, "self", clean_attention=clean, backend=backend,
        mask_cache=mask_cache,
    )  # fmt: skip


def packed_layout(counting: str = "document") -> torch.Tensor:
    """Two rows of L=1024 with different packings: documents that end inside SDAR blocks and inside
    128-token tiles, a one-token document, and a trailing padding pseudo-document."""
    from megatron_sdar.masks import document_ids_from_lengths, make_layout

    rows = [[300, 211, 1, 499, 13], [1024]]
    doc_ids = torch.stack([document_ids_from_lengths(r, device="cuda") for r in rows])
    return make_layout(doc_ids, 4, counting)


def qkv(seq2: int, batch: int, seed: int = 0) -> list[torch.Tensor]:
    """Megatron-layout ``[2L, b, heads, d]`` query, key and value and an output gradient (bf16)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [
        (seq2, batch, HEADS, HEAD_DIM),
        (seq2, batch, GROUPS, HEAD_DIM),
        (seq2, batch, GROUPS, HEAD_DIM),
    ]
    tensors = [torch.randn(s, device="cuda", dtype=torch.bfloat16, generator=gen) for s in shapes]
    grad = torch.randn(seq2, batch, HEADS * HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    return [*tensors, grad]


def forward_backward(module, layout, base, dtype=torch.bfloat16) -> list[torch.Tensor]:
    q, k, v, grad = (t.to(dtype) for t in base)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = module(q, k, v, layout)
    out.backward(grad)
    return [out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]


@pytest.mark.parametrize("backend", ["flex", "split", "split-tiles"])
@pytest.mark.parametrize("counting", ["document", "window"])
@pytest.mark.parametrize("clean", ["block_causal", "causal"])
def test_fast_backends_match_dense_sdpa(clean, counting, backend):
    """split-tiles: the split back end with its band as compiled torch tiles."""
    from megatron_sdar.attention.cache import SDARMaskCache

    layout = packed_layout(counting)
    base = qkv(2 * layout.shape[-1], layout.shape[0])
    cache = SDARMaskCache(split_band="tiles" if backend == "split-tiles" else "auto")
    fast = forward_backward(core_attention(clean, backend.removesuffix("-tiles"), cache), layout, base)
    sdpa = forward_backward(core_attention(clean, "sdpa", SDARMaskCache()), layout, base)
    exact = forward_backward(core_attention(clean, "sdpa", SDARMaskCache()), layout, base, torch.float32)
    for name, f, s, e in zip(("out", "dq", "dk", "dv"), fast, sdpa, exact):
        scale = e.abs().max().item()
        fast_vs_sdpa = (f - s).abs().max().item()
        fast_err, sdpa_err = (f - e).abs().max().item(), (s - e).abs().max().item()
        print(f"{backend} {clean} {counting} {name}: max|{backend}-sdpa| {fast_vs_sdpa:.2e}, vs fp32: "
              f"{backend} {fast_err:.2e} sdpa {sdpa_err:.2e} (max|ref| {scale:.2f})")  # fmt: skip
        assert fast_vs_sdpa <= 2e-2 * scale, (name, fast_vs_sdpa, scale)
        assert fast_err <= max(2 * sdpa_err, 1e-2 * scale), (name, fast_err, sdpa_err, scale)


def test_one_mask_for_all_layers():
    """Layers fed the same layout tensor share one mask from the cache they are given (a model gives
    its layers its own), forward and backward; a new layout, or the same one changed in place, gets a
    new mask."""
    from megatron_sdar.attention.cache import SDARMaskCache

    layout = packed_layout()
    q, k, v, _ = qkv(2 * layout.shape[-1], layout.shape[0])
    cache = SDARMaskCache()
    layers = [core_attention("block_causal", "flex", cache, layer_number=i + 1) for i in range(6)]
    assert all(layer.mask_cache is cache for layer in layers)

    def run(layout) -> None:
        x = q.clone().requires_grad_()
        for layer in layers:  # each layer's output becomes the next layer's query
            x = layer(x, k, v, layout).view_as(q) + x
        x.float().pow(2).mean().backward()

    before = cache.builds
    run(layout)
    run(layout)
    assert cache.builds - before == 1
    run(packed_layout())  # equal contents, new tensor
    assert cache.builds - before == 2
    layout[:, 0, -5:] += 1  # in-place change: the cached mask must not be reused
    run(layout)
    assert cache.builds - before == 3


def test_compiled_rope_matches_eager():
    """The compiled rotation (one kernel each way) against the eager one Megatron also runs: bf16,
    forward and backward, within one bf16 rounding of the eager result."""
    from megatron_sdar.positions import PositionRotaryEmbedding, _rope, apply_rope

    rotary = PositionRotaryEmbedding(128, rotary_base=1e6)
    positions = torch.arange(1024, device="cuda").view(1, -1).repeat(2, 1)
    cos, sin = rotary.tables(positions, torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(0)
    t = torch.randn(1024, 2, 8, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    grad = torch.randn_like(t)
    results = []
    for fn in (apply_rope, _rope):
        x = t.clone().requires_grad_()
        out = fn(x, cos, sin)
        out.backward(grad)
        results.append((out.float(), x.grad.float()))
    (out_c, grad_c), (out_e, grad_e) = results
    assert (out_c - out_e).abs().max() <= 2**-7 * out_e.abs().max()
    assert (grad_c - grad_e).abs().max() <= 2**-7 * grad_e.abs().max()
