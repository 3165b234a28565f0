"""Core-attention modules and norms of the local spec on CPU: the AR baseline's causal attention,
the kernel-option defaults, and the torch norm that replaces Megatron's eager one."""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType

from megatron_sdar.attention.core import CausalCoreAttention, SDARCoreAttention
from megatron_sdar.attention.flex import default_kernel_options
from megatron_sdar.model.base import qwen3_transformer_config
from megatron_sdar.model.norms import TorchNorm
from megatron_sdar.model.specs import ar_layer_spec, sdar_layer_spec


def config(**overrides):
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16)
    return qwen3_transformer_config(**{**base, **overrides})


def test_causal_attention_equals_explicit_masked_softmax():
    torch.manual_seed(0)
    s, b, d = 12, 2, 16
    q = torch.randn(s, b, 4, d)
    k, v = torch.randn(s, b, 2, d), torch.randn(s, b, 2, d)
    out = CausalCoreAttention(config(), 1, AttnMaskType.causal, "self")(q, k, v, None)
    kr, vr = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, kr) / d**0.5
    scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
    expected = torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), vr).reshape(s, b, -1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_causal_attention_refuses_masks_and_dropout():
    module = CausalCoreAttention(config(), 1, AttnMaskType.causal, "self")
    q = torch.randn(4, 1, 4, 16)
    with pytest.raises(ValueError, match="no attention mask"):
        module(q, q[:, :, :2], q[:, :, :2], torch.ones(1, 1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="--attention-dropout 0"):
        CausalCoreAttention(config(attention_dropout=0.1), 1, AttnMaskType.causal, "self")
    with pytest.raises(ValueError, match="causal masks only"):
        CausalCoreAttention(config(), 1, AttnMaskType.padding, "self")


def test_specs_use_the_right_cores_and_norms(megatron_world):
    from megatron_sdar.config import SDARConfig

    cfg = config()
    sdar = sdar_layer_spec(cfg, SDARConfig(block_size=4, mask_token_id=1))
    ar = ar_layer_spec(cfg)
    for spec, core in ((sdar, SDARCoreAttention), (ar, CausalCoreAttention)):
        layer = spec.layer_specs[0].submodules
        attn = layer.self_attention.submodules
        assert getattr(attn.core_attention, "func", attn.core_attention) is core
        assert layer.input_layernorm is TorchNorm and attn.q_layernorm is TorchNorm
        assert spec.layer_norm is TorchNorm


@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
def test_torch_norm_matches_torch_modules(normalization):
    torch.manual_seed(0)
    norm = TorchNorm(config(normalization=normalization), 16, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        if norm.bias is not None:
            norm.bias.uniform_(-0.5, 0.5)
    ref = torch.nn.RMSNorm(16, eps=1e-6) if normalization == "RMSNorm" else torch.nn.LayerNorm(16, eps=1e-6)
    ref.load_state_dict(norm.state_dict())
    x = torch.randn(5, 2, 3, 16)
    torch.testing.assert_close(norm(x), ref(x))
    assert set(norm.state_dict()) == set(ref.state_dict())  # checkpoints keep Megatron's keys


def test_fused_norm_function_matches_eager():
    from megatron_sdar.model.norms import _layer_norm, _rms_norm

    x, w, b = torch.randn(6, 16, dtype=torch.bfloat16), torch.rand(16) + 0.5, torch.randn(16)
    rms = torch.nn.functional.rms_norm(x.float(), (16,), w, 1e-6).to(torch.bfloat16)
    torch.testing.assert_close(_rms_norm(x, w, 1e-6), rms, atol=0, rtol=0)
    ln = torch.nn.functional.layer_norm(x.float(), (16,), w, b, 1e-6).to(torch.bfloat16)
    torch.testing.assert_close(_layer_norm(x, w, b, 1e-6), ln, atol=0, rtol=0)


def test_kernel_option_defaults_only_for_measured_gpus():
    assert default_kernel_options(torch.randn(1, 4, 8, 128, dtype=torch.bfloat16)) is None  # CPU


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("percent", [1.0, 0.5])
def test_rope_rotation_is_megatrons_bit_for_bit(dtype, percent):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from megatron_sdar.positions import PositionRotaryEmbedding, _rope

    torch.manual_seed(0)
    rotary = PositionRotaryEmbedding(16, rotary_base=1e6, rotary_percent=percent)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1], [5, 6, 7, 8, 9, 10]])
    cos, sin = rotary.tables(positions, dtype)
    t = torch.randn(6, 2, 4, 16).to(dtype)
    want = _apply_rotary_pos_emb_bshd(t, rotary(positions))
    assert torch.equal(_rope(t, cos, sin), want)


def test_model_applies_rope_in_core_attention_like_megatron(megatron_world):
    """SDARModel hands RoPE to its core attentions (positions ride on the layout); the result equals
    Megatron's own RoPE path for the same model, forward and backward."""
    from megatron_sdar.batch import build_sdar_batch
    from megatron_sdar.config import SDARConfig
    from megatron_sdar.masks import document_ids_from_lengths
    from tests.helpers import tiny_model

    vocab, seq = 64, 16
    sdar = SDARConfig(block_size=4, mask_token_id=vocab - 1, position_ids="document")
    model = tiny_model(sdar, vocab_size=vocab, seq_length=seq, rotary_base=1e6)
    assert all(
        core.rotary is model.sdar_rotary for core in model.modules() if isinstance(core, SDARCoreAttention)
    )
    tokens = torch.randint(0, vocab - 1, (2, seq), generator=torch.Generator().manual_seed(0))
    doc_ids = torch.stack([document_ids_from_lengths([7, 9]), document_ids_from_lengths([16])])
    batch = build_sdar_batch(
        tokens, doc_ids, torch.ones_like(tokens, dtype=torch.bool), sdar, torch.Generator().manual_seed(1)
    )
    results = []
    for in_core in (True, False):
        model.apply_rope_in_core(in_core)
        model.zero_grad(set_to_none=True)
        out = model(batch.input_ids, batch.position_ids, batch.layout, labels=batch.labels)
        out[..., 0].sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    (fused, fused_grads), (megatron, megatron_grads) = results
    torch.testing.assert_close(fused, megatron, atol=1e-6, rtol=1e-6)
    for a, b in zip(fused_grads, megatron_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_positions_on_the_layout_need_rotary_settings():
    module = SDARCoreAttention(config(), 1, AttnMaskType.arbitrary, "self", backend="sdpa")
    layout = torch.zeros(1, 3, 4, dtype=torch.int32)
    q = torch.randn(8, 1, 4, 16)
    with pytest.raises(ValueError, match=r"needs the \[batch, 2, L\] layout tensor"):
        module(q, q[:, :, :2], q[:, :, :2], layout)


def test_ar_model_equals_gpt_model_with_megatrons_rope(megatron_world, monkeypatch):
    """ARModel (RoPE in the core attention) is GPTModel with Megatron's RoPE: same state dict,
    same per-token loss and gradients."""
    from megatron.core.models.gpt import GPTModel

    # Megatron's RotaryEmbedding moves its frequencies to the current CUDA device: keep them here.
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")

    from megatron_sdar.model.ar import ARModel
    from tests.helpers import TINY

    cfg = qwen3_transformer_config(use_cpu_initialization=True, params_dtype=torch.float32, **TINY)
    common = dict(
        config=cfg, transformer_layer_spec=ar_layer_spec(cfg), vocab_size=64, max_sequence_length=16
    )
    torch.manual_seed(0)
    reference = GPTModel(position_embedding_type="rope", rotary_base=1e6, **common)
    model = ARModel(position_embedding_type="rope", rotary_base=1e6, **common)
    model.load_state_dict(reference.state_dict())  # strict: checkpoints are interchangeable
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(16).expand(2, 16)
    labels = torch.roll(tokens, -1, dims=-1)
    results = []
    for m in (model, reference):
        loss = m(tokens, positions, None, labels=labels)
        loss.sum().backward()
        results.append((loss.detach(), {n: p.grad for n, p in m.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=1e-6)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], atol=1e-6, rtol=1e-5, msg=name)
    with pytest.raises(ValueError, match="attention_mask=None"):
        model(tokens, positions, torch.ones(2, 1, 16, 16, dtype=torch.bool))
