"""Released SDAR checkpoints (SDARForCausalLM / SDARMoeForCausalLM folders, config.json as the SDAR
authors publish it) import with their block size and mask token id, round-trip HF -> Megatron (any
TP/PP/EP) -> HF SDAR bit-exact, and both converters keep the source's dtype unless ``--dtype`` says
otherwise."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.test_conversion import VOCAB, hf_model
from tests.test_moe_conversion import hf_moe
from tools import convert_hf_to_mcore, convert_mcore_to_hf

MASK, EOS, BLOCK = VOCAB - 6, VOCAB - 8, 4  # a spare row below vocab_size, like SDAR's 151669


def released_config(cfg: dict, moe: bool, dtype: str | None) -> dict:
    """A transformers-written Qwen3 / Qwen3-MoE config rewritten the way the SDAR releases ship."""
    theta = cfg.pop("rope_parameters")["rope_theta"]
    for key in ("dtype", "layer_types", "pad_token_id", "num_local_experts"):
        cfg.pop(key, None)
    module = "sdar_moe" if moe else "sdar"
    prefix = "SDARMoe" if moe else "SDAR"
    cfg.update(
        architectures=[f"{prefix}ForCausalLM"], model_type=module,
        auto_map={
            "AutoConfig": f"configuration_{module}.{prefix}Config",
            "AutoModel": f"modeling_{module}.{prefix}Model",
            "AutoModelForCausalLM": f"modeling_{module}.{prefix}ForCausalLM",
        },
        block_size=BLOCK, mask_token_id=MASK, fuse_cross_entropy=True, attn_implementation="flex_attention",
        use_cache=True, bos_token_id=EOS, eos_token_id=EOS, ep_size=1, micro_forward=False,
        skip_checkpoint=False, use_deepep=False, debug=False, max_window_layers=28,
        use_sliding_window=False, sliding_window=None if moe else 4096, rope_scaling=None, rope_theta=theta,
        transformers_version="4.52.4",
    )  # fmt: skip
    if dtype is not None:
        cfg["torch_dtype"] = dtype
    if moe:
        cfg.update(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
            router_aux_loss_coef=0.001, decoder_sparse_step=1, mlp_only_layers=[], output_router_logits=False,
        )  # fmt: skip
    return cfg


def save_tokenizer(folder) -> None:
    """A word-level tokenizer whose ``<|MASK|>`` is the config's mask_token_id (rows above it spare)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(EOS)}
    vocab.update({"<|endoftext|>": EOS, "<|im_start|>": EOS + 1, "<|MASK|>": MASK})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="w0").save_pretrained(
        folder
    )


def released_folder(root, kind: str, dtype: torch.dtype):
    """A tiny HF SDAR folder (``kind`` "dense": tied like SDAR-1.7B/4B; "moe": like SDAR-30B-A3B)."""
    moe = kind == "moe"
    model = hf_moe() if moe else hf_model("qwen3", tied=True)[0]
    folder = root / f"{kind}-{str(dtype).removeprefix('torch.')}"
    model.to(dtype).save_pretrained(folder)
    path = folder / "config.json"
    name = str(dtype).removeprefix("torch.")
    path.write_text(json.dumps(released_config(json.loads(path.read_text()), moe, name), indent=2))
    if not moe:
        save_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdar")
    return {
        (kind, dtype): released_folder(root, kind, dtype)
        for kind, dtype in [("dense", torch.bfloat16), ("moe", torch.bfloat16), ("dense", torch.float32)]
    }


def tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def architecture(ckpt) -> dict:
    return json.loads((ckpt / "sdar_architecture.json").read_text())


def convert(src, ckpt, *flags: str) -> dict:
    return convert_hf_to_mcore.main(["--hf-dir", str(src), "--save", str(ckpt), *flags])


def export(ckpt, out, *flags: str) -> tuple[dict, dict]:
    convert_mcore_to_hf.main(["--load", str(ckpt), "--save", str(out), *flags])
    return json.loads((out / "config.json").read_text()), tensors(out)


def stored_in(ckpt) -> set[torch.dtype]:
    from megatron_sdar.conversion.torch_dist import stored_dtypes

    return set(stored_dtypes(str(ckpt / "release")).values())


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_released_config_is_accepted_with_its_sdar_fields(folders, kind, tmp_path, capsys, monkeypatch):
    src = folders[(kind, torch.bfloat16)]
    info = convert(src, tmp_path / "ckpt")
    arch = info["architecture"]
    assert arch.family == ("qwen3_moe" if kind == "moe" else "qwen3") and arch.qk_layernorm
    assert arch.block_size == BLOCK and arch.mask_token_id == MASK and arch.vocab_size == VOCAB
    assert arch.num_experts == (4 if kind == "moe" else 0) and arch.tied_embeddings == (kind == "dense")
    recorded = architecture(tmp_path / "ckpt")
    assert recorded["architecture"]["block_size"] == BLOCK
    assert recorded["architecture"]["mask_token_id"] == MASK
    flags = recorded["megatron_args"]
    assert flags[flags.index("--sdar-mask-token-id") + 1] == str(MASK)
    assert recorded["dtype"] == "bfloat16" and recorded["dtype_source"] == "config.json torch_dtype"
    out = capsys.readouterr().out
    assert "mask token id 90 (from config.json), block size 4 (from config.json)" in out
    assert "dtype: bfloat16 (from config.json torch_dtype)" in out
    if kind == "dense":  # the mask token named by its string: the tokenizer loads without the remote
        asked = []  # code config.json names, and without stopping to ask whether to run it
        monkeypatch.setattr("builtins.input", lambda prompt="": asked.append(prompt) or "n")
        convert(src, tmp_path / "named", "--mask-token", "<|MASK|>", "--block-size", str(BLOCK))
        assert not asked
        assert architecture(tmp_path / "named")["architecture"]["mask_token_id"] == MASK
        assert "notice" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "kind, layout",
    [
        ("dense", ["--tensor-model-parallel-size", "2"]),
        ("dense", ["--pipeline-model-parallel-size", "2"]),
        ("moe", ["--expert-model-parallel-size", "2"]),
        ("moe", ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2"]),
    ],
    ids=["dense-tp2", "dense-pp2", "moe-ep2", "moe-tp2-ep2"],
)
def test_round_trip_to_hf_sdar_is_bit_exact(folders, kind, layout, tmp_path):
    src = folders[(kind, torch.bfloat16)]
    convert(src, tmp_path / "ckpt", *layout)
    assert stored_in(tmp_path / "ckpt") == {torch.bfloat16}
    config, exported = export(tmp_path / "ckpt", tmp_path / "hf", "--format", "sdar")
    original = tensors(src)
    assert set(exported) == set(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    assert config["architectures"] == ["SDARMoeForCausalLM" if kind == "moe" else "SDARForCausalLM"]
    assert config["block_size"] == BLOCK and config["mask_token_id"] == MASK
    assert config["torch_dtype"] == "bfloat16"
    if kind == "dense":
        assert config["model_type"] == "sdar"
    else:
        assert config["num_experts"] == 4 and config["num_experts_per_tok"] == 2


def test_dtype_defaults_keep_the_source_and_dtype_overrides(folders, tmp_path, capsys):
    fp32, bf16 = folders[("dense", torch.float32)], folders[("dense", torch.bfloat16)]
    original32, original16 = tensors(fp32), tensors(bf16)

    # fp32 source, no flags: fp32 all the way
    convert(fp32, tmp_path / "c32")
    assert stored_in(tmp_path / "c32") == {torch.float32}
    config, exported = export(tmp_path / "c32", tmp_path / "h32")
    assert config["torch_dtype"] == "float32"
    assert all(
        exported[k].dtype == torch.float32 and torch.equal(exported[k], v) for k, v in original32.items()
    )

    # --dtype fp16 on the export casts every tensor and names float16
    config, exported = export(tmp_path / "c32", tmp_path / "h16", "--dtype", "fp16")
    assert config["torch_dtype"] == "float16"
    assert all(torch.equal(exported[k], v.to(torch.float16)) for k, v in original32.items())

    # --dtype fp16 on the import is what the export then keeps
    info = convert(bf16, tmp_path / "c16", "--dtype", "fp16")
    assert info["dtype"] == "float16" and stored_in(tmp_path / "c16") == {torch.float16}
    assert architecture(tmp_path / "c16")["dtype_source"] == "--dtype"
    assert "the tensors stored in bfloat16 are cast to it" in capsys.readouterr().out
    config, exported = export(tmp_path / "c16", tmp_path / "h16b")
    assert config["torch_dtype"] == "float16"
    assert all(torch.equal(exported[k], v.to(torch.float16)) for k, v in original16.items())

    # no dtype in the config: the stored one; transformers 5's "dtype" key counts as the config's
    for i, (change, expected, source) in enumerate([
        ({"torch_dtype": None}, "float32", "the stored safetensors tensors"),
        ({"torch_dtype": None, "dtype": "float16"}, "float16", "config.json dtype"),
        ({"torch_dtype": "auto"}, "float32", "the stored safetensors tensors"),
    ]):  # fmt: skip
        folder = tmp_path / f"src{i}"
        shutil.copytree(fp32, folder)
        cfg = {**json.loads((fp32 / "config.json").read_text()), **change}
        (folder / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
        info = convert(folder, tmp_path / f"ck{i}")
        assert info["dtype"] == expected
        assert architecture(tmp_path / f"ck{i}")["dtype_source"].startswith(source)


def test_export_keeps_mixed_stored_dtypes(folders, tmp_path, capsys):
    """A checkpoint with fp32 norms and bf16 matrices is written as stored; torch_dtype names bf16."""
    import dataclasses

    from megatron_sdar.conversion.architecture import Architecture
    from megatron_sdar.conversion.megatron import meta_model
    from megatron_sdar.conversion.torch_dist import Layout, checkpoint_layout, read_parameter, save_torch_dist

    src = folders[("dense", torch.float32)]
    convert(src, tmp_path / "c32")
    arch = Architecture(**architecture(tmp_path / "c32")["architecture"])
    meta = meta_model(arch)
    layout = checkpoint_layout(meta)
    shapes = {n: tuple(p.shape) for n, p in meta.named_parameters()}
    chunks = [dataclasses.replace(c, dtype=torch.float32 if "norm" in c.key else torch.bfloat16) for c in
              layout.chunks]  # fmt: skip
    by_param: dict[str, list] = {}
    for c in layout.chunks:
        by_param.setdefault(c.param, []).append(c)
    release = str(tmp_path / "c32" / "release")
    mixed = tmp_path / "mixed"
    common = torch.load(tmp_path / "c32" / "release" / "common.pt", weights_only=False)
    save_torch_dist(
        str(mixed), Layout(chunks, layout.objects),
        lambda p: read_parameter(release, by_param[p], shapes[p], torch.float32), common,
    )  # fmt: skip
    shutil.copy(tmp_path / "c32" / "sdar_architecture.json", mixed)
    assert stored_in(mixed) == {torch.float32, torch.bfloat16}
    capsys.readouterr()
    config, exported = export(mixed, tmp_path / "hf")
    assert config["torch_dtype"] == "bfloat16"
    assert "stored in several dtypes" in capsys.readouterr().out
    for name, tensor in tensors(src).items():
        want = torch.float32 if "norm" in name else torch.bfloat16
        assert exported[name].dtype == want and torch.equal(exported[name], tensor.to(want)), name


def test_sdar_fields_from_flags_and_refusals(folders, tmp_path, capsys):
    src = folders[("dense", torch.bfloat16)]
    # an explicit id or block size replaces the config's, with a notice
    info = convert(src, tmp_path / "a", "--mask-token", "7", "--block-size", "8")
    assert info["architecture"].mask_token_id == 7 and info["architecture"].block_size == 8
    out = capsys.readouterr().out
    assert "--mask-token 7 replaces config.json's mask_token_id 90" in out
    assert "--block-size 8 replaces config.json's block_size 4" in out

    # a token string that is not the config's mask token: another token, or one to be added
    for token, named in [("w5", "is token id 5"), ("<|new|>", "is not in the tokenizer")]:
        with pytest.raises(SystemExit, match=f"{named}, but config.json's mask_token_id is 90"):
            convert(src, tmp_path / "b", "--mask-token", token)
    with pytest.raises(SystemExit, match="--block-size must be positive"):
        convert(src, tmp_path / "b", "--block-size", "0")

    # configs the converter cannot take as they are
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    cfg = json.loads((src / "config.json").read_text())
    for change, message in [
        ({"mask_token_id": VOCAB}, f"mask_token_id {VOCAB} is not a row of the {VOCAB}-row embedding"),
        ({"block_size": 0}, "block_size 0 is not a positive integer"),
        ({"torch_dtype": "float64"}, "config.json torch_dtype is 'float64'.*pass --dtype"),
        ({"use_sliding_window": True}, "sliding-window"),
        ({"layer_types": ["full_attention", "sliding_attention"]}, "sliding-window"),
    ]:
        (broken / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(SystemExit, match=message):
            convert(broken, tmp_path / "b")

    # no dtype in the config and tensors stored in two dtypes: --dtype is needed
    from safetensors.torch import load_file, save_file

    weights = load_file(broken / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"].float()
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    (broken / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "torch_dtype"}))
    with pytest.raises(SystemExit, match=r"tensors do not settle it \(.*bfloat16, 1 float32\); pass --dtype"):
        convert(broken, tmp_path / "b")
    assert not (tmp_path / "b").exists()
    assert convert(broken, tmp_path / "c", "--dtype", "bf16")["dtype"] == "bfloat16"
