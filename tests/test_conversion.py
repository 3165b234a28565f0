"""HF Llama/Qwen3 <-> Megatron parameter mapping: logits parity and bit-exact round trips."""

from __future__ import annotations

import pytest
import torch

from megatron_sdar.config import SDARConfig
from megatron_sdar.conversion.mapping import AttentionShape, hf_to_mcore_state_dict, mcore_to_hf_state_dict
from megatron_sdar.masks import document_ids_from_lengths, make_layout
from megatron_sdar.positions import sdar_position_ids
from tests.helpers import tiny_model

VOCAB, HIDDEN, LAYERS, HEADS, KV, HEAD_DIM, FFN = 96, 64, 2, 4, 2, 16, 128


def hf_model(arch: str, tied: bool):
    import transformers

    common = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=256,
        rms_norm_eps=1e-6, tie_word_embeddings=tied,
    )  # fmt: skip
    if arch == "qwen3":
        cfg = transformers.Qwen3Config(head_dim=HEAD_DIM, rope_theta=1e6, **common)
        model = transformers.Qwen3ForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(head_dim=HEAD_DIM, rope_theta=1e4, **common)
        model = transformers.LlamaForCausalLM(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # non-trivial norms too
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    return model.eval(), cfg


@pytest.mark.parametrize("arch, tied", [("qwen3", False), ("qwen3", True), ("llama", True), ("llama", False)])
def test_logits_match_hf_and_round_trip_is_exact(arch, tied, megatron_world):
    hf, cfg = hf_model(arch, tied)
    shape = AttentionShape(HEADS, KV, HEAD_DIM)
    hf_sd = hf.state_dict()
    mc_sd = hf_to_mcore_state_dict(hf_sd, shape, LAYERS, tied)

    sdar = SDARConfig(block_size=4, mask_token_id=VOCAB - 1, clean_attention="causal")
    model = tiny_model(
        sdar, vocab_size=VOCAB, seq_length=32, tied=tied, num_layers=LAYERS, hidden_size=HIDDEN,
        num_attention_heads=HEADS, num_query_groups=KV, kv_channels=HEAD_DIM, ffn_hidden_size=FFN,
        qk_layernorm=(arch == "qwen3"), rotary_base=cfg.rope_parameters["rope_theta"],
    )  # fmt: skip
    missing, unexpected = model.load_state_dict(mc_sd, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    model.eval()

    torch.manual_seed(1)
    tokens = torch.randint(0, VOCAB - 1, (2, 32))
    with torch.no_grad():
        expected = hf(tokens).logits
        doc_ids = document_ids_from_lengths([32]).repeat(2, 1)
        layout = make_layout(doc_ids, 4, "document")
        hidden = model.decode(torch.cat([tokens, tokens], -1), sdar_position_ids(doc_ids, False), layout)
        weight = model.shared_embedding_or_output_weight() if tied else None
        logits, _ = model.output_layer(hidden[32:], weight=weight)  # clean half, token-causal
        logits = logits.transpose(0, 1)
    diff = (logits - expected).abs().max().item()
    assert diff <= 1e-4, diff
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))

    back = mcore_to_hf_state_dict(model.state_dict(), shape)
    for name, tensor in hf_sd.items():
        if tied and name == "lm_head.weight":
            continue
        assert torch.equal(back[name], tensor), name
    assert set(back) == set(hf_sd) - ({"lm_head.weight"} if tied else set())
