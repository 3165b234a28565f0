"""Qwen3-MoE conversion: HF -> Megatron checkpoint whose SDAR model (clean half, causal variant)
reproduces transformers' logits at EP=1 and EP=2; HF -> Megatron -> HF is bit-exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import free_port
from tools import convert_hf_to_mcore, convert_mcore_to_hf

ROOT = Path(__file__).resolve().parent.parent
VOCAB, EXPERTS, TOPK = 96, 4, 2


def hf_moe(norm_topk_prob: bool = True):
    import transformers

    cfg = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=EXPERTS,
        num_experts_per_tok=TOPK, norm_topk_prob=norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=[],
        max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.Qwen3MoeForCausalLM(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    return model.eval()


@pytest.fixture(scope="module", params=[True, False], ids=["norm-topk", "no-norm-topk"])
def converted(request, tmp_path_factory):
    model = hf_moe(request.param)
    work = tmp_path_factory.mktemp("moe")
    model.save_pretrained(work / "hf")
    convert_hf_to_mcore.main(
        ["--hf-dir", str(work / "hf"), "--save", str(work / "ckpt"), "--dtype", "fp32",
         "--expert-model-parallel-size", "2"]
    )  # fmt: skip
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.save(tokens, work / "tokens.pt")
    with torch.no_grad():
        expected = model(tokens).logits
    return work, model, expected


def run_workers(work: Path, ep: int, dispatcher: str) -> torch.Tensor:
    port = free_port()
    out = work / f"logits-ep{ep}-{dispatcher}.pt"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "moe_worker.py"),
                str(work / "ckpt"),
                str(work / "tokens.pt"),
                str(out),
                "--ep",
                str(ep),
                "--rank",
                str(r),
                "--world",
                str(ep),
                "--port",
                str(port),
                "--dispatcher",
                dispatcher,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for r in range(ep)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    return torch.load(out)


def test_architecture_and_flags(converted):
    work, _, _ = converted
    info = json.loads((work / "ckpt" / "sdar_architecture.json").read_text())
    arch, flags = info["architecture"], info["megatron_args"]
    assert (
        arch["family"] == "qwen3_moe" and arch["num_experts"] == EXPERTS and arch["moe_router_topk"] == TOPK
    )
    assert flags[flags.index("--num-experts") + 1] == str(EXPERTS)
    assert flags[flags.index("--moe-ffn-hidden-size") + 1] == "32"
    assert ("--moe-router-pre-softmax" in flags) == (not arch["moe_norm_topk_prob"])


@pytest.mark.parametrize("ep, dispatcher", [(1, "alltoall"), (2, "allgather")])
def test_logits_match_transformers(converted, ep, dispatcher):
    work, _, expected = converted
    logits = run_workers(work, ep, dispatcher)
    assert logits.shape == expected.shape
    diff = (logits - expected).abs().max().item()
    print(f"EP={ep} {dispatcher}: max abs logit diff vs transformers {diff:.2e}")
    assert diff <= 1e-4, diff
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))


def test_round_trip_is_bit_exact(converted, tmp_path):
    import transformers
    from safetensors.torch import load_file

    work, model, expected = converted
    out = tmp_path / "ar"
    convert_mcore_to_hf.main(
        ["--load", str(work / "ckpt"), "--save", str(out), "--format", "ar", "--dtype", "fp32"]
    )
    exported = {}
    for f in out.glob("*.safetensors"):
        exported.update(load_file(f))
    from safetensors import safe_open

    with safe_open(str(work / "hf" / "model.safetensors"), "pt") as f:
        original = {k: f.get_tensor(k) for k in f.keys()}
    assert set(exported) == set(original)
    assert all(torch.equal(exported[k], original[k]) for k in original)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded).__name__ == "Qwen3MoeForCausalLM"
    with torch.no_grad():
        assert torch.equal(reloaded(torch.load(work / "tokens.pt")).logits, expected)
    sdar = tmp_path / "sdar"
    convert_mcore_to_hf.main(
        ["--load", str(work / "ckpt"), "--save", str(sdar), "--mask-token-id", "95", "--block-size", "4"]
    )
    config = json.loads((sdar / "config.json").read_text())
    assert config["architectures"] == ["SDARMoeForCausalLM"] and config["base_model_type"] == "qwen3_moe"
    assert config["num_experts"] == EXPERTS and config["num_experts_per_tok"] == TOPK


def test_expert_parallel_size_must_divide_experts(converted, tmp_path):
    work, _, _ = converted
    with pytest.raises(SystemExit, match="4 experts do not split over EP=3"):
        convert_hf_to_mcore.main(
            ["--hf-dir", str(work / "hf"), "--save", str(tmp_path / "x"), "--expert-model-parallel-size", "3"]
        )
