"""Load a converted Qwen3-MoE checkpoint into the SDAR model at a given expert parallelism and
write the clean-half logits (rank 0). Megatron's MoE router assumes CUDA, so this runs under the
test-only CPU mapping of ``tests/cpu_cuda.py``.

    python tests/moe_worker.py CKPT TOKENS.pt OUT.pt --ep 2 --rank R --world 2 --port P
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore")

from tests import cpu_cuda  # noqa: E402

cpu_cuda.install()

import torch  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("ckpt")
    p.add_argument("tokens")
    p.add_argument("out")
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--dispatcher", default="alltoall")
    a = p.parse_args()

    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_sdar.config import SDARConfig
    from megatron_sdar.conversion.architecture import Architecture
    from megatron_sdar.conversion.megatron import moe_config
    from megatron_sdar.masks import document_ids_from_lengths, make_layout
    from megatron_sdar.model.base import qwen3_transformer_config
    from megatron_sdar.model.sdar import build_sdar_model
    from megatron_sdar.positions import sdar_position_ids

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(a.port))
    torch.distributed.init_process_group("gloo", rank=a.rank, world_size=a.world)
    parallel_state.initialize_model_parallel(expert_model_parallel_size=a.ep)
    model_parallel_cuda_manual_seed(0)
    with open(os.path.join(a.ckpt, "sdar_architecture.json")) as f:
        arch = Architecture(**json.load(f)["architecture"])
    config = qwen3_transformer_config(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads, num_query_groups=arch.num_query_groups,
        kv_channels=arch.kv_channels, layernorm_epsilon=arch.norm_epsilon, qk_layernorm=True,
        expert_model_parallel_size=a.ep, use_cpu_initialization=True, **moe_config(arch, a.dispatcher),
    )  # fmt: skip
    sdar = SDARConfig(block_size=4, mask_token_id=arch.vocab_size - 1, clean_attention="causal")
    model = build_sdar_model(
        config, sdar, vocab_size=arch.padded_vocab_size, max_sequence_length=arch.max_position_embeddings,
        share_embeddings_and_output_weights=arch.tied_embeddings, rotary_base=arch.rotary_base,
    )  # fmt: skip
    release = os.path.join(a.ckpt, "release")
    loaded = dist_checkpointing.load(model.sharded_state_dict(), release, strict="assume_ok_unexpected")
    model.load_state_dict(loaded, strict=False)
    model.eval()

    tokens = torch.load(a.tokens)
    n = tokens.shape[1]
    doc_ids = document_ids_from_lengths([n]).repeat(tokens.shape[0], 1)
    with torch.no_grad():
        hidden = model.decode(
            torch.cat([tokens, tokens], -1),
            sdar_position_ids(doc_ids, False),
            make_layout(doc_ids, 4, "document"),
        )
        weight = model.shared_embedding_or_output_weight() if arch.tied_embeddings else None
        logits = model.output_layer(hidden[n:], weight=weight)[0].transpose(0, 1)[..., : arch.vocab_size]
    if a.rank == 0:
        torch.save(logits.contiguous(), a.out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
