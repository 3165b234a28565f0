"""tools/convert_hf_to_mcore.py: HF safetensors (single or sharded) -> torch_dist checkpoint that
loads into the SDAR model with logits equal to HF's, at TP=1 and resharded to TP=2 / PP=2; the
error cases refuse clearly and leave no checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_sdar.config import SDARConfig
from megatron_sdar.masks import document_ids_from_lengths, make_layout
from megatron_sdar.positions import sdar_position_ids
from tests.helpers import free_port, tiny_model
from tests.test_conversion import FFN, HEAD_DIM, HEADS, HIDDEN, KV, LAYERS, VOCAB, hf_model
from tools import convert_hf_to_mcore

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", params=[("qwen3", False, None), ("llama", True, "2KB")])
def hf_dir(request, tmp_path_factory):
    arch, tied, shard = request.param
    model, _ = hf_model(arch, tied)
    out = tmp_path_factory.mktemp(f"hf-{arch}")
    model.save_pretrained(out, max_shard_size=shard or "1GB")
    if shard:
        assert (out / "model.safetensors.index.json").exists()
    return out, model, arch, tied


def load_at_tp1(ckpt: str, arch: str, tied: bool):
    from megatron.core import dist_checkpointing

    theta = 1e6 if arch == "qwen3" else 1e4
    model = tiny_model(
        SDARConfig(block_size=4, mask_token_id=VOCAB - 1, clean_attention="causal"), vocab_size=128,
        seq_length=32, tied=tied, num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
        num_query_groups=KV, kv_channels=HEAD_DIM, ffn_hidden_size=FFN, qk_layernorm=(arch == "qwen3"),
        rotary_base=theta, seed=5,
    )  # fmt: skip
    loaded = dist_checkpointing.load(model.sharded_state_dict(), ckpt, strict="assume_ok_unexpected")
    model.load_state_dict(loaded, strict=False)
    return model.eval()


def clean_half_logits(model, tokens, tied):
    with torch.no_grad():
        n = tokens.shape[1]
        doc_ids = document_ids_from_lengths([n]).repeat(tokens.shape[0], 1)
        hidden = model.decode(
            torch.cat([tokens, tokens], -1),
            sdar_position_ids(doc_ids, False),
            make_layout(doc_ids, 4, "document"),
        )
        weight = model.shared_embedding_or_output_weight() if tied else None
        return model.output_layer(hidden[n:], weight=weight)[0].transpose(0, 1)


def test_convert_and_load_tp1(hf_dir, tmp_path, megatron_world):
    src, hf, arch, tied = hf_dir
    save = tmp_path / "ckpt"
    result = convert_hf_to_mcore.main(["--hf-dir", str(src), "--save", str(save), "--dtype", "fp32",
                                       "--mask-token", str(VOCAB - 1), "--block-size", "4"])  # fmt: skip
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "release"
    info = json.loads((save / "sdar_architecture.json").read_text())
    assert (
        info["architecture"]["padded_vocab_size"] == 128 and "--sdar-mask-token-id" in info["megatron_args"]
    )
    assert ("--qk-layernorm" in info["megatron_args"]) == (arch == "qwen3")
    model = load_at_tp1(result["path"], arch, tied)
    tokens = torch.randint(0, VOCAB - 1, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf(tokens).logits
    logits = clean_half_logits(model, tokens, tied)[..., :VOCAB]
    assert (logits - expected).abs().max().item() <= 1e-4
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))
    assert model.embedding.word_embeddings.weight[VOCAB:].abs().sum() == 0  # padded rows


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_checkpoint_reshards_to_tp2_and_pp2(hf_dir, tmp_path, tp, pp, megatron_world):
    src, _, arch, tied = hf_dir
    save = tmp_path / "ckpt"
    result = convert_hf_to_mcore.main(["--hf-dir", str(src), "--save", str(save), "--dtype", "fp32",
                                       "--tensor-model-parallel-size", str(tp)])  # fmt: skip
    reference = tmp_path / "ref.pt"
    torch.save(
        {n: p.detach() for n, p in load_at_tp1(result["path"], arch, tied).named_parameters()}, reference
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    port = str(free_port())
    extra = ["--tied"] if tied else []
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.parallel_worker",
                "--phase",
                "load",
                "--ref",
                str(reference),
                "--ckpt",
                result["path"],
                "--arch",
                arch,
                "--tp",
                str(tp),
                "--pp",
                str(pp),
                "--rank",
                str(r),
                "--world-size",
                "2",
                "--port",
                port,
                *extra,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for r in range(2)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, (out[-2000:], err[-3000:])


def test_refusals(hf_dir, tmp_path):
    src, _, _, _ = hf_dir
    save = tmp_path / "ckpt"
    convert_hf_to_mcore.main(["--hf-dir", str(src), "--save", str(save)])
    with pytest.raises(SystemExit, match="--overwrite"):
        convert_hf_to_mcore.main(["--hf-dir", str(src), "--save", str(save)])
    with pytest.raises(SystemExit, match="do not split over TP=3"):
        convert_hf_to_mcore.main(
            ["--hf-dir", str(src), "--save", str(tmp_path / "x"), "--tensor-model-parallel-size", "3"]
        )
    with pytest.raises(SystemExit, match="outside the embedding"):
        convert_hf_to_mcore.main(
            ["--hf-dir", str(src), "--save", str(tmp_path / "y"), "--mask-token", "4000"]
        )
    broken = tmp_path / "broken"
    broken.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    for change, message in [
        ({"architectures": ["MistralForCausalLM"]}, "unsupported architecture"),
        ({"architectures": ["Qwen3MoeForCausalLM"]}, "lacks num_experts"),
        (
            {
                "architectures": ["Qwen3MoeForCausalLM"],
                "num_experts": 4,
                "moe_intermediate_size": 32,
                "num_experts_per_tok": 2,
                "mlp_only_layers": [0],
            },
            "dense layers between MoE layers",
        ),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling"),
        ({"use_sliding_window": True}, "sliding-window"),
    ]:
        (broken / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(SystemExit, match=message):
            convert_hf_to_mcore.main(["--hf-dir", str(broken), "--save", str(tmp_path / "z")])
    (broken / "config.json").write_text(json.dumps(cfg))
    (broken / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "missing.safetensors"}})
    )
    with pytest.raises(SystemExit, match="missing"):
        convert_hf_to_mcore.main(["--hf-dir", str(broken), "--save", str(tmp_path / "z")])
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()


def test_round_trip_back_to_hf(hf_dir, tmp_path):
    """HF -> Megatron -> HF is bit-exact (fp32); the AR export loads in transformers with the same
    logits; the SDAR export carries the SDAR config fields."""
    import transformers
    from safetensors.torch import load_file

    from tools import convert_mcore_to_hf

    src, hf, arch, tied = hf_dir
    ckpt = tmp_path / "ckpt"
    convert_hf_to_mcore.main(["--hf-dir", str(src), "--save", str(ckpt), "--dtype", "fp32"])
    ar = tmp_path / "ar"
    convert_mcore_to_hf.main(["--load", str(ckpt), "--save", str(ar), "--format", "ar", "--dtype", "fp32"])
    original = {k: v for k, v in hf.state_dict().items() if not (tied and k == "lm_head.weight")}
    exported = {}
    for f in ar.glob("*.safetensors"):
        exported.update(load_file(f))
    assert set(exported) == set(original)
    assert all(torch.equal(exported[k], original[k]) for k in original)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(ar).eval()
    tokens = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, hf(tokens).logits)

    with pytest.raises(SystemExit, match="mask token id and block size"):
        convert_mcore_to_hf.main(["--load", str(ckpt), "--save", str(tmp_path / "s0")])
    sdar = tmp_path / "sdar"
    convert_mcore_to_hf.main(
        ["--load", str(ckpt), "--save", str(sdar), "--mask-token-id", "95", "--block-size", "4"]
    )
    config = json.loads((sdar / "config.json").read_text())
    assert config["architectures"] == ["SDARForCausalLM"] and config["model_type"] == "sdar"
    assert config["block_size"] == 4 and config["mask_token_id"] == 95 and config["base_model_type"] == arch
    with pytest.raises(SystemExit, match="not empty"):
        convert_mcore_to_hf.main(
            ["--load", str(ckpt), "--save", str(sdar), "--mask-token-id", "95", "--block-size", "4"]
        )


def test_training_refuses_a_checkpoint_of_another_architecture(hf_dir, tmp_path, monkeypatch):
    from megatron.training.arguments import parse_args

    import pretrain_sdar
    from megatron_sdar.conversion.megatron import check_checkpoint_architecture

    src, _, arch, tied = hf_dir
    ckpt = tmp_path / "ckpt"
    convert_hf_to_mcore.main(["--hf-dir", str(src), "--save", str(ckpt)])
    flags = json.loads((ckpt / "sdar_architecture.json").read_text())["megatron_args"]
    monkeypatch.setattr(sys, "argv", ["pretrain_sdar.py", *flags])
    args = parse_args(pretrain_sdar._extra_args)
    args.padded_vocab_size = 128
    check_checkpoint_architecture(str(ckpt), args)  # the recorded flags match
    args.ffn_hidden_size = FFN * 2
    args.num_query_groups = 1
    with pytest.raises(ValueError, match="--ffn-hidden-size: checkpoint has 128, flags give 256") as err:
        check_checkpoint_architecture(str(ckpt), args)
    assert "--num-query-groups" in str(err.value)


def test_architecture_from_training_arguments():
    """A checkpoint written by training is described by the Megatron arguments it stores."""
    import types

    from megatron_sdar.conversion.architecture import architecture_from_megatron_args

    args = types.SimpleNamespace(
        num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, group_query_attention=True,
        num_query_groups=2, kv_channels=16, padded_vocab_size=768, rotary_base=1e6, layernorm_epsilon=1e-6,
        qk_layernorm=True, untie_embeddings_and_output_weights=True, max_position_embeddings=64,
        sdar_mask_token_id=1, sdar_block_size=4, normalization="RMSNorm", swiglu=True, add_bias_linear=False,
        position_embedding_type="rope", num_experts=None,
    )  # fmt: skip
    arch = architecture_from_megatron_args(args)
    assert arch.family == "qwen3" and arch.vocab_size == arch.padded_vocab_size == 768
    assert not arch.tied_embeddings and arch.mask_token_id == 1 and arch.block_size == 4
    assert architecture_from_megatron_args(args, vocab_size=600).vocab_size == 600
    with pytest.raises(ValueError, match="must be in 1..768"):
        architecture_from_megatron_args(args, vocab_size=1000)
    args.num_experts, args.moe_ffn_hidden_size, args.moe_router_topk, args.moe_aux_loss_coeff = 8, 32, 2, 1e-3
    moe = architecture_from_megatron_args(args)
    assert (
        moe.family == "qwen3_moe"
        and moe.num_experts == 8
        and moe.moe_router_topk == 2
        and moe.moe_norm_topk_prob
    )
    args.qk_layernorm, args.swiglu = False, False
    with pytest.raises(ValueError, match="mixture of experts without QK-norm.*SwiGLU"):
        architecture_from_megatron_args(args)


def _tokenizer_and_model(tmp_path):
    """A HF Llama whose embedding has exactly one row per token of its (BPE) tokenizer."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=80, special_tokens=["<unk>", "<|endoftext|>"])
    tok.train_from_iterator(["the mask token is new", "blocks decode in parallel"] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>")
    rows = len(fast)
    cfg = transformers.LlamaConfig(
        vocab_size=rows, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=1,
        num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=HEAD_DIM, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    out = tmp_path / "hf"
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out, model, rows


def test_adding_a_mask_token_grows_the_embedding_and_the_tokenizer(tmp_path):
    """A token the tokenizer lacks is added: a new embedding row (the mean of the others), the
    tokenizer saved with it, and the HF export round-trips it."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from tools import convert_mcore_to_hf

    src, hf, rows = _tokenizer_and_model(tmp_path)
    ckpt = tmp_path / "ckpt"
    info = convert_hf_to_mcore.main(
        ["--hf-dir", str(src), "--save", str(ckpt), "--dtype", "fp32", "--mask-token", "<|mask|>",
         "--block-size", "4"]
    )  # fmt: skip
    arch = info["architecture"]
    assert arch.mask_token_id == rows and arch.vocab_size == rows + 1 and arch.padded_vocab_size == 128
    tok = AutoTokenizer.from_pretrained(ckpt / "tokenizer")
    assert tok.convert_tokens_to_ids("<|mask|>") == rows and len(tok) == rows + 1
    assert tok("the mask").input_ids == AutoTokenizer.from_pretrained(src)("the mask").input_ids

    out = tmp_path / "sdar"
    convert_mcore_to_hf.main(["--load", str(ckpt), "--save", str(out), "--dtype", "fp32"])
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == rows + 1 and config["mask_token_id"] == rows
    weights = load_file(out / "model.safetensors")
    original = hf.state_dict()
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(weights[name][:rows], original[name])
        torch.testing.assert_close(weights[name][rows], original[name].mean(0))
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<|mask|>") == rows


def test_mask_token_ids_for_weights_only_folders(tmp_path):
    src, _, rows = _tokenizer_and_model(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (src / name).unlink(missing_ok=True)
    with pytest.raises(SystemExit, match=f"pass an id instead: an unused row below {rows}, or {rows} to add"):
        convert_hf_to_mcore.main(
            ["--hf-dir", str(src), "--save", str(tmp_path / "a"), "--mask-token", "<|m|>"]
        )
    with pytest.raises(SystemExit, match=f"outside the embedding's {rows} rows"):
        convert_hf_to_mcore.main(
            ["--hf-dir", str(src), "--save", str(tmp_path / "b"), "--mask-token", str(rows + 1)]
        )
    info = convert_hf_to_mcore.main(
        ["--hf-dir", str(src), "--save", str(tmp_path / "c"), "--mask-token", str(rows)]
    )
    assert (
        info["architecture"].vocab_size == rows + 1
        and not (tmp_path / "c" / "tokenizer" / "tokenizer.json").exists()
    )
    info = convert_hf_to_mcore.main(
        ["--hf-dir", str(src), "--save", str(tmp_path / "d"), "--mask-token", "3"]
    )
    assert info["architecture"].vocab_size == rows and info["architecture"].mask_token_id == 3
