"""What the converters say when their input or surroundings are wrong: every refusal is an
``error: ...`` message naming the file and the problem, a failed or interrupted conversion leaves no
output folder, a write another process left behind is cleaned up or respected, and a checkpoint
that does not split over the world's tensor-parallel size is refused before a model is built."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess

import pytest
import torch

from megatron_sdar.conversion import torch_dist
from megatron_sdar.conversion.architecture import Architecture
from megatron_sdar.conversion.hf import SafetensorsReader
from tools import convert_hf_to_mcore, convert_mcore_to_hf

VOCAB = 96


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny Qwen3 without a tokenizer, as one safetensors file and as shards with an index, and
    the Megatron checkpoint converted from it."""
    import transformers

    cfg = transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(cfg)
    root = tmp_path_factory.mktemp("errors")
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="40KB")
    assert len(list((root / "sharded").glob("*.safetensors"))) > 2
    convert_hf_to_mcore.main(["--hf-dir", str(root / "single"), "--save", str(root / "ckpt")])
    return root


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def convert(src, save, *extra):
    return convert_hf_to_mcore.main(["--hf-dir", str(src), "--save", str(save), *extra])


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def temporary(save, pid: int):
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())
    return save.parent / f"{save.name}.tmp-{host}-{pid}"


def test_a_mask_token_string_needs_a_tokenizer(folders, tmp_path):
    """transformers builds an empty tokenizer from config.json alone, which would give the string
    id 1, a trained row: refused, asking for an id."""
    ask = f"pass an id instead: an unused row below {VOCAB}, or {VOCAB} to add a row"
    src = folders / "single"
    said = re.escape(f"error: --mask-token '<|MASK|>' is a string but {src} has no tokenizer (none of ")
    with pytest.raises(SystemExit, match=f"{said}.*; {ask}"):
        convert(src, tmp_path / "a", "--mask-token", "<|MASK|>")
    empty = copy(src, tmp_path / "empty")
    (empty / "vocab.json").write_text("{}")
    (empty / "merges.txt").write_text("")
    with pytest.raises(SystemExit, match=f"the tokenizer in {empty} is empty .*; {ask}"):
        convert(empty, tmp_path / "b", "--mask-token", "<|MASK|>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_a_truncated_safetensors_file_is_named(folders, tmp_path, layout):
    src = copy(folders / layout, tmp_path / "hf")
    victim = sorted(src.glob("*.safetensors"))[-1]
    victim.write_bytes(victim.read_bytes()[:-100])
    said = rf"error: cannot read {victim}: .* \(truncated or damaged\? copy or download it again\)"
    with pytest.raises(SystemExit, match=said):
        convert(src, tmp_path / "ckpt")
    if layout == "sharded":  # the header read and the tensor read name it too
        reader = SafetensorsReader(str(src))
        with pytest.raises(ValueError, match=f"cannot read {victim}: "):
            reader.stored_dtypes()
        name = next(n for n, s in reader.weight_map.items() if s == victim.name)
        with pytest.raises(ValueError, match=f"cannot read {victim}: "):
            reader(name)
    assert not (tmp_path / "ckpt").exists()


def test_a_malformed_config_is_named_with_its_problem(folders, tmp_path):
    src = copy(folders / "single", tmp_path / "hf")
    path = src / "config.json"
    cfg = json.loads(path.read_text())
    for text, problem in [
        ('{"architectures": ["Qwen3ForCausalLM"], ', r"is not valid JSON \(Expecting"),
        ("[1, 2]", "holds a JSON list, not an object"),
        (json.dumps({k: v for k, v in cfg.items() if k != "num_hidden_layers"}), "lacks num_hidden_layers"),
        (json.dumps({**cfg, "hidden_size": "64"}), "has hidden_size '64' where a positive integer is needed"),
    ]:
        path.write_text(text)
        with pytest.raises(SystemExit, match=f"error: {path}:? {problem}"):
            convert(src, tmp_path / "ckpt")
    path.write_text(json.dumps(cfg))
    (src / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(SystemExit, match=rf"error: {src / 'model.safetensors.index.json'} is not valid JSON"):
        convert(src, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize(
    "flag",
    [
        "--tensor-model-parallel-size",
        "--pipeline-model-parallel-size",
        "--expert-model-parallel-size",
        "--make-vocab-size-divisible-by",
    ],
)
@pytest.mark.parametrize("value", ["0", "-2"])
def test_sizes_below_one_are_refused(folders, tmp_path, flag, value):
    with pytest.raises(SystemExit, match=f"^error: {flag} must be a positive integer, not {value}$"):
        convert(folders / "single", tmp_path / "ckpt", flag, value)
    assert not (tmp_path / "ckpt").exists()


def test_a_conversion_that_fails_while_writing_leaves_nothing(folders, tmp_path):
    """A tensor of the wrong size is found only when it is written: the error is the converter's
    own message (not the distributed checkpoint's wrapped traceback), and no folder is left."""
    from safetensors.torch import load_file, save_file

    src = copy(folders / "single", tmp_path / "hf")
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 100)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SystemExit, match="^error: decoder.layers.0.mlp.linear_fc2.weight: HF gives shape"):
        convert(src, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_what_a_killed_conversion_left_is_removed(folders, tmp_path, capsys):
    save = tmp_path / "ckpt"
    pid = dead_pid()
    leftover = temporary(save, pid)
    (leftover / "release").mkdir(parents=True)
    (leftover / "release" / "__0_0.distcp").write_bytes(b"\0" * 2**21)
    convert(folders / "single", save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    err = capsys.readouterr().err
    assert f"notice: removed {leftover} (2 MB), left by an interrupted write of {save}" in err


def test_a_long_conversion_reports_progress(folders, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch_dist, "PROGRESS_EVERY_S", 0.0)  # as if each parameter took long
    convert(folders / "single", tmp_path / "ckpt")
    err = capsys.readouterr().err
    assert re.search(r"convert_hf_to_mcore: 1/\d+ parameters, 0\.00/0\.00 GB, \d+ MB/s, .* left", err)
    assert re.search(r"convert_hf_to_mcore: (\d+)/\1 parameters in 0:00:\d\d", err)
    convert_mcore_to_hf.main(
        ["--load", str(tmp_path / "ckpt"), "--save", str(tmp_path / "hf"), "--format", "ar"]
    )
    err = capsys.readouterr().err
    assert re.search(r"convert_mcore_to_hf: 1/\d+ parameters, .* MB/s, .* left", err)
    assert re.search(r"convert_mcore_to_hf: (\d+)/\1 parameters in 0:00:\d\d", err)


def test_a_conversion_running_on_the_same_target_is_refused(folders, tmp_path):
    save = tmp_path / "ckpt"
    running = temporary(save, os.getppid())
    running.mkdir()
    with pytest.raises(SystemExit, match=f"error: {save} is being written by process {os.getppid()}"):
        convert(folders / "single", save)
    with pytest.raises(SystemExit, match=f"error: {save} is being written by process {os.getppid()}"):
        convert_mcore_to_hf.main(["--load", str(folders / "ckpt"), "--save", str(save), "--format", "ar"])
    assert [p.name for p in tmp_path.iterdir()] == [running.name]


def test_progress_lines_give_rate_and_time_left():
    out = io.StringIO()
    progress = torch_dist.Progress("convert", items=4, total_bytes=4 * 2**30, every=0.0, stream=out)
    for _ in range(4):
        progress.step(2**30)
    progress.done()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and lines[0].startswith("convert: 1/4 parameters, 1.00/4.00 GB, ")
    assert re.fullmatch(r"convert: 3/4 parameters, 3\.00/4\.00 GB, \d+ MB/s, 0:00:\d\d elapsed, about "
                        r"0:00:\d\d left", lines[2])  # fmt: skip
    assert re.fullmatch(r"convert: 4/4 parameters in 0:00:\d\d", lines[3])
    quiet = io.StringIO()
    progress = torch_dist.Progress("convert", items=4, total_bytes=4, stream=quiet)  # a short run
    for _ in range(4):
        progress.step(1)
    progress.done()
    assert quiet.getvalue() == ""


def test_export_errors_name_the_file(folders, tmp_path):
    ckpt = copy(folders / "ckpt", tmp_path / "ckpt")
    out = tmp_path / "hf"

    def export(*extra):
        convert_mcore_to_hf.main(["--load", str(ckpt), "--save", str(out), "--format", "ar", *extra])

    for flag in ("--max-shard-size-mb", "--block-size", "--vocab-size"):
        with pytest.raises(SystemExit, match=f"^error: {flag} must be a positive integer, not 0$"):
            export(flag, "0")
    with pytest.raises(SystemExit, match=f"error: --mask-token-id {VOCAB} is not a row of the checkpoint's"):
        export("--mask-token-id", str(VOCAB))
    with pytest.raises(SystemExit, match=r"error: vocabulary size 500 must be in 1\.\.128"):
        export("--vocab-size", "500")
    tracker = ckpt / "latest_checkpointed_iteration.txt"
    tracker.write_text("relase")
    with pytest.raises(SystemExit, match=f"error: {tracker} names iteration 'relase'; expected 'release'"):
        export()
    tracker.write_text("release")
    recorded = ckpt / "sdar_architecture.json"
    good = recorded.read_text()
    recorded.write_text(good[:50])
    with pytest.raises(SystemExit, match=f"error: {recorded} is not valid JSON"):
        export()
    entry = json.loads(good)
    del entry["architecture"]["num_layers"]
    recorded.write_text(json.dumps(entry))
    with pytest.raises(SystemExit, match=f"error: {recorded}: 'architecture' lacks num_layers"):
        export()
    recorded.write_text(good)
    shard = ckpt / "release" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(
        SystemExit, match=rf"error: cannot read \S+ from the checkpoint in {ckpt / 'release'}: "
    ):
        export()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def smollm2_like(vocab_size: int, padded: int) -> Architecture:
    return Architecture(
        family="llama", num_layers=30, hidden_size=576, ffn_hidden_size=1536, num_attention_heads=9,
        num_query_groups=3, kv_channels=64, vocab_size=vocab_size, padded_vocab_size=padded, rotary_base=1e5,
        norm_epsilon=1e-5, qk_layernorm=False, tied_embeddings=True, max_position_embeddings=8192,
    )  # fmt: skip


def test_a_vocabulary_that_does_not_split_over_the_world_is_refused_with_the_flag_to_change():
    """Converted at TP=1 with a mask row added, 49,153 rows pad to 49,280, which 3 ranks cannot share."""
    from megatron_sdar.inference.loading import check_tensor_parallel

    arch = smollm2_like(49153, 49280)
    check_tensor_parallel(arch, 1)
    with pytest.raises(ValueError) as err:
        check_tensor_parallel(arch, 3)
    said = str(err.value)
    assert (
        "does not split over tensor parallel size 3 (the world size): the padded vocabulary of 49,280" in said
    )
    assert (
        "convert again with --tensor-model-parallel-size 3 (pads the 49,153-row vocabulary to 49,536" in said
    )
    assert "or with --make-vocab-size-divisible-by 384" in said and "N up to 8: 1)" in said
    with pytest.raises(ValueError, match="9 heads / 3 KV groups. Run on a number of ranks") as err:
        check_tensor_parallel(arch, 2)
    assert "convert again" not in str(err.value)
    trained = smollm2_like(49280, 49280)
    with pytest.raises(ValueError, match="the padded vocabulary of 49,280 rows. Run on") as err:
        check_tensor_parallel(trained, 3, converted=False)
    assert "convert again" not in str(err.value)
    check_tensor_parallel(smollm2_like(49153, 49536), 3)
