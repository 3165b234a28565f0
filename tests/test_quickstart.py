"""The quick start's CPU part: corpus, tokenizer and data are built, and the training command it
prints parses and validates with Megatron's argument parser and ours, and its model builds."""

from __future__ import annotations

import sys

import pytest
import torch

sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), "..", "examples"))

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
    import json
    import os

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
    assert result["evaluation"][0]["tokens_per_forward"] == 1.0
    config = json.loads((tmp_path / "hf-sdar" / "config.json").read_text())
    assert config["model_type"] == "sdar" and config["block_size"] == 4
    assert config["mask_token_id"] == config["vocab_size"] - 1  # the added <|mask|> row
    assert (tmp_path / "summary.json").exists() and (tmp_path / "eval.json").exists()


def test_math_data_is_kept_when_present(tmp_path, monkeypatch):
    """Problem files with the requested counts are reused (no reasoning-gym needed); others are
    regenerated with the fixed seeds."""
    import quickstart as recipe

    sft, held_out = tmp_path / "gsm_sft.jsonl", tmp_path / "gsm_eval.jsonl"
    sft.write_text('{"messages": []}\n' * 3)
    held_out.write_text('{"question": "q", "answer": "#### 1"}\n' * 2)
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # importing it now fails
    assert recipe.math_data(str(tmp_path), 3, 2) == (str(sft), str(held_out))
    assert sft.read_text() == '{"messages": []}\n' * 3
    with pytest.raises(SystemExit, match="reasoning-gym is missing"):
        recipe.math_data(str(tmp_path), 4, 2)
    monkeypatch.delitem(sys.modules, "reasoning_gym")
    recipe.math_data(str(tmp_path), 4, 2)
    lines = sft.read_text().splitlines()
    assert len(lines) == 4 and all(
        json_line.startswith('{"messages": [{"role": "user"') for json_line in lines
    )
