"""GPU: FlexAttention and dense-mask SDPA give the same SDAR attention (forward and backward, bf16),
and one mask serves many layers."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("clean", ["block_causal", "causal"])
def test_flex_matches_dense_sdpa(clean):
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_sdar.attention import SDARCoreAttention, SDARMaskCache
    from megatron_sdar.masks import document_ids_from_lengths, make_layout
    from megatron_sdar.model import qwen3_transformer_config

    config = qwen3_transformer_config(
        num_layers=1, hidden_size=512, num_attention_heads=8, num_query_groups=4, kv_channels=64
    )
    layout = make_layout(
        document_ids_from_lengths([300, 211, 500, 13], device="cuda").unsqueeze(0), 4, "document"
    )
    seq2 = 2 * layout.shape[-1]
    gen = torch.Generator(device="cuda").manual_seed(0)
    base = [
        torch.randn(seq2, 1, h, 64, device="cuda", dtype=torch.bfloat16, generator=gen) for h in (8, 4, 4)
    ]
    results = {}
    for backend in ("flex", "sdpa"):
        cache = SDARMaskCache()
        module = SDARCoreAttention(config, 1, AttnMaskType.arbitrary, "self", clean_attention=clean,
                                   backend=backend, mask_cache=cache)  # fmt: skip
        q, k, v = (t.clone().requires_grad_() for t in base)
        out = None
        for _ in range(3):  # three "layers" share the cached mask
            out = module(q, k, v, layout)
        assert cache.builds == 1
        out.float().pow(2).mean().backward()
        results[backend] = [out.float(), q.grad.float(), k.grad.float(), v.grad.float()]
    for name, a, b in zip(("out", "dq", "dk", "dv"), results["flex"], results["sdpa"]):
        rel = ((a - b).abs().max() / b.abs().max()).item()
        assert rel < 2e-2, (name, rel)
