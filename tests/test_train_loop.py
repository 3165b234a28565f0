"""``pretrain_sdar.py`` end to end through Megatron's own training loop, on CPU.

Each run is a subprocess under ``tests/cpu_cuda.py`` (CUDA calls mapped onto the CPU, gloo). They
prove what only the whole loop can: SDAR CPT trains, logs the SDAR metrics, saves Megatron
checkpoints, and a run stopped at step N and resumed reaches bit-identical weights, optimizer state
and losses; SFT windows and the AR baseline train; ``--finetune`` starts from a checkpoint written
by ``tools/convert_hf_to_mcore.py``; a checkpoint trained at TP=2 exports to HF; TensorBoard (and
W&B, offline, when installed) gets the console's metrics under the same names; settings that cannot
run stop the entry before any model is built, all listed in one message.

With ``SDAR_TRAIN_LOOP_ON_CUDA=1`` on a GPU machine the same tests run the loop on the GPU instead
(NCCL, FlexAttention; tests that need more ranks than GPUs are skipped).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import cpt_from_scratch as quickstart  # noqa: E402

SEQ = 64
MODEL = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--group-query-attention",
    "--num-query-groups", "2", "--kv-channels", "16", "--ffn-hidden-size", "128",
    "--normalization", "RMSNorm", "--norm-epsilon", "1e-6", "--qk-layernorm", "--swiglu",
    "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--position-embedding-type", "rope",
    "--rotary-base", "1000000", "--no-rope-fusion", "--attention-dropout", "0", "--hidden-dropout", "0",
    "--init-method-std", "0.02", "--max-position-embeddings", str(SEQ),
]  # fmt: skip
LOOP = [
    "--seq-length", str(SEQ), "--micro-batch-size", "4", "--global-batch-size", "8",
    "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "2",
    "--weight-decay", "0.1", "--clip-grad", "1.0", "--calculate-per-token-loss",
    "--transformer-impl", "local", "--no-persist-layer-norm", "--no-gradient-accumulation-fusion",
    "--seed", "1234", "--log-interval", "1", "--eval-interval", "5", "--eval-iters", "2",
    "--distributed-backend", "gloo", "--num-workers", "1",
]  # fmt: skip
METRICS = ("lm loss", "masked ce", "masked acc", "mean t")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The quick start's data: pydoc corpus, BPE tokenizer (eod 0, mask 1), indexed dataset."""
    work = tmp_path_factory.mktemp("loop")
    result = quickstart.main(["--dry-run", "--workdir", str(work), "--vocab-size", "600"])
    data = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", result["tokenizer"]]
    data += ["--data-path", result["data_prefix"], "--split", "98,2,0"]
    return {"work": work, "data": data, "mask": str(result["mask_id"]), "tokenizer": result["tokenizer"]}


ON_CUDA = os.environ.get("SDAR_TRAIN_LOOP_ON_CUDA") == "1"


def run_training(flags: list[str], nproc: int = 1, env: dict[str, str] | None = None):
    """Run ``pretrain_sdar.py`` with ``flags`` on CPU (or the GPU, see above), with ``env`` added to
    the environment; return the finished process (output captured as text)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    common = {"PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env = {**os.environ, **common, **(env or {})}
    if ON_CUDA:
        if torch.cuda.device_count() < nproc:
            pytest.skip(f"needs {nproc} GPUs")
        flags = ["nccl" if f == "gloo" else f for f in flags]
        script = [str(ROOT / "pretrain_sdar.py"), *flags]
    else:
        script = [str(ROOT / "tests" / "cpu_cuda.py"), str(ROOT / "pretrain_sdar.py"), *flags]
    port = str(free_port())
    if nproc == 1:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
        cmd += ["--master-addr", "127.0.0.1", "--master-port", port, *script]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def train(flags: list[str], nproc: int = 1, env: dict[str, str] | None = None) -> str:
    """:func:`run_training`'s output (fails the test on error)."""
    proc = run_training(flags, nproc, env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


def iterations(log: str) -> dict[int, dict[str, str]]:
    """Logged metrics per iteration, as printed (exact comparison of the printed digits)."""
    found = {}
    for m in re.finditer(r"iteration\s+(\d+)/\s*\d+ \|(.*)", log):
        fields = dict(re.findall(r"([a-z_ /]+): ([-0-9.E+]+) \|", m.group(2)))
        found[int(m.group(1))] = {k.strip(): v for k, v in fields.items()}
    return found


def validation(log: str, iteration: int) -> dict[str, str]:
    """The SDAR metrics of the validation at ``iteration``, as printed."""
    m = re.search(rf"validation loss at iteration {iteration} \|(.*)", log)
    assert m, f"no validation at iteration {iteration}"
    fields = dict(re.findall(r"([a-z /]+) value: ([-0-9.E+]+) \|", m.group(1)))
    return {k.strip(): v for k, v in fields.items() if k.strip() in METRICS}


def tensors(checkpoint_dir: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a torch_dist checkpoint, as global tensors."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp_path / f"{checkpoint_dir.parent.name}-{checkpoint_dir.name}.pt"
    dcp_to_torch_save(checkpoint_dir, out)
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        elif isinstance(value, torch.Tensor):
            flat[prefix[:-1]] = value

    walk("", torch.load(out, weights_only=False))
    return flat


def test_cpt_trains_checkpoints_and_resumes_exactly(corpus, tmp_path):
    sdar = ["--sdar-mask-token-id", corpus["mask"], "--sdar-block-size", "4"]
    base = [*MODEL, *LOOP, *corpus["data"], *sdar, "--train-iters", "10", "--save-interval", "5"]
    straight = train([*base, "--save", str(tmp_path / "a")])
    first_half = train([*base, "--save", str(tmp_path / "b"), "--exit-interval", "5"])
    resumed = train([*base, "--save", str(tmp_path / "b"), "--load", str(tmp_path / "b")])

    whole = iterations(straight)
    assert sorted(whole) == list(range(1, 11))
    assert all(set(METRICS) <= set(v) for v in whole.values())
    assert all(
        0.0 < float(v["mean t"]) < 1.0 and 0.0 <= float(v["masked acc"]) <= 1.0 for v in whole.values()
    )
    assert sorted(iterations(first_half)) == [1, 2, 3, 4, 5]
    assert "loading distributed checkpoint from" in resumed and "at iteration 5" in resumed
    after = iterations(resumed)
    assert sorted(after) == list(range(6, 11))
    # Megatron prints the first iteration of every run and folds it into the next report, so the
    # report after it averages two steps in the resumed run; every other figure must be identical.
    for it in (6, 8, 9, 10):
        assert {k: after[it][k] for k in METRICS} == {k: whole[it][k] for k in METRICS}, it
    assert validation(resumed, 10) == validation(straight, 10)
    assert set(validation(straight, 10)) == set(METRICS)
    assert (tmp_path / "a" / "latest_checkpointed_iteration.txt").read_text().strip() == "10"

    a = tensors(tmp_path / "a" / "iter_0000010", tmp_path)
    b = tensors(tmp_path / "b" / "iter_0000010", tmp_path)
    assert set(a) == set(b)
    assert any(k.startswith("optimizer.") for k in a), "optimizer state is part of the checkpoint"
    assert any("decoder.layers" in k for k in a)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    early = tensors(tmp_path / "a" / "iter_0000005", tmp_path)
    assert any(not torch.equal(early[k], a[k]) for k in a if "decoder.layers" in k)

    # a resume that changes the learning-rate schedule: refused up front, saying what differs
    longer = run_training(
        [*base, "--save", str(tmp_path / "b"), "--load", str(tmp_path / "b"), "--train-iters", "12"]
    )
    assert longer.returncode == 2, (longer.stdout + longer.stderr)[-4000:]
    assert "the learning-rate schedule differs from the checkpoint's" in longer.stderr
    assert (
        "total number of iterations (--lr-decay-iters (default --train-iters)): 10 in the checkpoint, 12 now"
        in longer.stderr
    )


def test_block_size_schedule_switches_mid_run_and_resumes_exactly(corpus, tmp_path):
    """``--sdar-block-size-schedule 1:0,2:2,4:4``: the logged block size is 1, 2, 4 from the steps
    after 0, 2 and 4 completed iterations (logged as 1, 3 and 5); a run resumed from iteration 4
    trains at 4 with the figures of the uninterrupted run; a resume that changes the schedule stops."""
    sdar = ["--sdar-mask-token-id", corpus["mask"], "--sdar-block-size", "4"]
    base = [*MODEL, *LOOP, *corpus["data"], *sdar, "--train-iters", "6", "--save-interval", "4"]
    straight = train([*base, "--sdar-block-size-schedule", "1:0,2:2,4:4", "--save", str(tmp_path / "a")])
    resumed = train(
        [*base, "--sdar-block-size-schedule", "1:0, 2:2, 4:4", "--load", str(tmp_path / "a"),
         "--ckpt-step", "4", "--save", str(tmp_path / "b")]
    )  # fmt: skip

    whole = iterations(straight)
    assert {it: float(v["block size"]) for it, v in whole.items()} == {1: 1, 2: 1, 3: 2, 4: 2, 5: 4, 6: 4}
    assert all(0.0 < float(v["lm loss"]) < 20.0 for v in whole.values())  # finite, at every block size
    assert "starts at iteration 0 with block size 1; validation and test use block size 4" in straight
    assert "training starts at iteration 4 with block size 4" in resumed and "at iteration 4" in resumed
    after = iterations(resumed)
    assert sorted(after) == [5, 6] and float(after[6]["block size"]) == 4.0
    logged = (*METRICS, "block size")
    assert {k: after[5][k] for k in logged} == {k: whole[5][k] for k in logged}
    assert validation(resumed, 5) == validation(straight, 5)
    assert re.search(r"validation loss at iteration 5 \|.* block size value: 4\.0+E\+00 \|", straight)

    changed = run_training([*base, "--sdar-block-size-schedule", "1:0,4:4", "--load", str(tmp_path / "a")])
    assert changed.returncode == 2, (changed.stdout + changed.stderr)[-4000:]
    recorded, given = "--sdar-block-size-schedule '1:0,2:2,4:4'", "--sdar-block-size-schedule '1:0,4:4'"
    refusal = f"(iter_0000006): the checkpoint was trained with {recorded} but this run gives {given}"
    assert refusal in changed.stderr


def test_output_on_masked_positions_trains_like_the_whole_noised_half(corpus):
    """``--sdar-output-positions masked`` (the TP=1 default) and ``noised`` log the same figures."""
    sdar = ["--sdar-mask-token-id", corpus["mask"], "--sdar-block-size", "4"]
    base = [*MODEL, *LOOP, *corpus["data"], *sdar, "--train-iters", "3", "--eval-iters", "0"]
    masked = iterations(train([*base, "--sdar-output-positions", "masked"]))
    noised = iterations(train([*base, "--sdar-output-positions", "noised"]))
    assert sorted(masked) == sorted(noised) == [1, 2, 3]
    for it in masked:
        for key in ("lm loss", "masked ce", "masked acc", "mean t"):
            assert float(masked[it][key]) == pytest.approx(float(noised[it][key]), rel=1e-4), (it, key)


def test_sft_stage_and_ar_objective_train(corpus, tmp_path):
    from tools import preprocess_sft

    chats = tmp_path / "chat.jsonl"
    with chats.open("w") as f:
        for i in range(60):
            f.write(json.dumps({"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."}) + "\n")
    from transformers import AutoTokenizer

    chat_tokenizer = AutoTokenizer.from_pretrained(corpus["tokenizer"])
    chat_tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    chat_tokenizer.save_pretrained(tmp_path / "tokenizer")
    prefix = tmp_path / "sft"
    summary = preprocess_sft.main(
        ["--input", str(chats), "--tokenizer", str(tmp_path / "tokenizer"), "--output-prefix", str(prefix),
         "--block-size", "4", "--seq-length", str(SEQ)]
    )  # fmt: skip
    assert summary["examples"] == 60 and summary["dropped"] == 0
    tokenizer = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tmp_path / "tokenizer")]
    sft = train(
        [*MODEL, *LOOP, *tokenizer, "--data-path", str(prefix), "--train-iters", "4",
         "--eval-iters", "0", "--sdar-stage", "sft", "--sdar-mask-token-id", corpus["mask"],
         "--sdar-block-size", "4"]
    )  # fmt: skip
    logged = iterations(sft)
    assert sorted(logged) == [1, 2, 3, 4] and all(set(METRICS) <= set(v) for v in logged.values())

    ar = train([*MODEL, *LOOP, *corpus["data"], "--train-iters", "4", "--sdar-objective", "ar"])
    logged = iterations(ar)
    assert sorted(logged) == [1, 2, 3, 4]
    assert all("lm loss" in v and "masked ce" not in v for v in logged.values())
    assert float(logged[1]["lm loss"]) > 5.0  # about ln(600) at initialisation


def test_finetune_from_a_converted_hf_checkpoint(corpus, tmp_path):
    """HF Qwen3 -> convert_hf_to_mcore -> pretrain_sdar.py --load --finetune: the run starts at
    iteration 0 from the converted weights (with lr 0 the saved weights equal them exactly)."""
    import transformers

    from tools import convert_hf_to_mcore

    cfg = transformers.Qwen3Config(
        vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=SEQ, rms_norm_eps=1e-6,
        rope_theta=1e6, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    converted = tmp_path / "converted"
    convert_hf_to_mcore.main(["--hf-dir", str(tmp_path / "hf"), "--save", str(converted), "--dtype", "fp32"])
    recorded = json.loads((converted / "sdar_architecture.json").read_text())["megatron_args"]
    flags = [*recorded, "--no-rope-fusion", *LOOP, *corpus["data"], "--sdar-mask-token-id", corpus["mask"]]
    flags += ["--sdar-block-size", "4", "--train-iters", "3", "--eval-iters", "0"]
    flags += ["--lr", "0", "--min-lr", "0", "--lr-warmup-iters", "0", "--lr-decay-style", "constant"]
    out = train(
        [
            *flags,
            "--load",
            str(converted),
            "--finetune",
            "--save",
            str(tmp_path / "ft"),
            "--save-interval",
            "3",
        ]
    )
    assert sorted(iterations(out)) == [1, 2, 3]
    assert float(iterations(out)[1]["lm loss"]) > 0
    start = tensors(converted / "release", tmp_path)
    trained = tensors(tmp_path / "ft" / "iter_0000003", tmp_path)
    weights = [k for k in start if not k.endswith("_extra_state")]
    assert weights and all(torch.equal(start[k], trained[k]) for k in weights)

    wrong = [a if a != "128" else "256" for a in flags]  # --ffn-hidden-size 128 -> 256
    env = dict(os.environ, PYTHONPATH=str(ROOT), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    proc = subprocess.run(
        [sys.executable, "tests/cpu_cuda.py", "pretrain_sdar.py", *wrong, "--load", str(converted),
         "--finetune"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0 and "--ffn-hidden-size: checkpoint has 128, flags give 256" in proc.stderr


def test_tp2_training_checkpoint_exports_to_hf(corpus, tmp_path):
    """Train at TP=2 (two gloo processes), then export the training checkpoint to HF: the export
    holds the trained weights (not the initial ones) with the shapes transformers expects."""
    import transformers
    from safetensors.torch import load_file

    from tools import convert_mcore_to_hf

    sdar = ["--sdar-mask-token-id", corpus["mask"], "--sdar-block-size", "4"]
    run = [*MODEL, *LOOP, *corpus["data"], *sdar, "--train-iters", "3", "--eval-iters", "0"]
    run += ["--tensor-model-parallel-size", "2", "--save", str(tmp_path / "tp2"), "--save-interval", "3"]
    run += ["--sdar-output-positions", "masked"]  # the masked positions' index broadcast over TP
    out = train(run, nproc=2)
    assert sorted(iterations(out)) == [1, 2, 3]
    hf = tmp_path / "hf"
    convert_mcore_to_hf.main(
        ["--load", str(tmp_path / "tp2"), "--save", str(hf), "--format", "ar", "--dtype", "fp32"]
    )
    config = transformers.AutoConfig.from_pretrained(hf)
    assert config.num_hidden_layers == 2 and config.vocab_size == 768  # padded for TP=2: 128 x 2
    assert (hf / "tokenizer.json").exists()  # the training run's tokenizer directory
    model = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
    exported = {}
    for f in hf.glob("*.safetensors"):
        exported.update(load_file(f))
    saved = tensors(tmp_path / "tp2" / "iter_0000003", tmp_path)
    torch.testing.assert_close(
        exported["model.embed_tokens.weight"],
        saved["embedding.word_embeddings.weight"].float(),
        rtol=0,
        atol=0,
    )
    torch.testing.assert_close(
        exported["model.layers.1.mlp.down_proj.weight"],
        saved["decoder.layers.mlp.linear_fc2.weight"][1].float(),
        rtol=0,
        atol=0,
    )
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(10).unsqueeze(0)).logits).all()


def test_moe_finetune_with_expert_parallelism(corpus, tmp_path):
    """A converted Qwen3-MoE checkpoint trains with SDAR CPT at EP=2 (two gloo processes): the
    router's load-balancing loss is logged next to the SDAR metrics and the checkpoint is saved."""
    import transformers

    from tools import convert_hf_to_mcore

    cfg = transformers.Qwen3MoeConfig(
        vocab_size=600, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=SEQ, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.Qwen3MoeForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    converted = tmp_path / "converted"
    convert_hf_to_mcore.main(
        ["--hf-dir", str(tmp_path / "hf"), "--save", str(converted), "--expert-model-parallel-size", "2"]
    )
    recorded = json.loads((converted / "sdar_architecture.json").read_text())["megatron_args"]
    flags = [*recorded, "--no-rope-fusion", *LOOP, *corpus["data"], "--sdar-mask-token-id", corpus["mask"]]
    flags += ["--sdar-block-size", "4", "--train-iters", "3", "--eval-iters", "0"]
    flags += ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "allgather"]
    out = train(
        [
            *flags,
            "--load",
            str(converted),
            "--finetune",
            "--save",
            str(tmp_path / "ft"),
            "--save-interval",
            "3",
        ],
        nproc=2,
    )
    logged = iterations(out)
    assert sorted(logged) == [1, 2, 3]
    assert all(set(METRICS) <= set(v) and float(v["load_balancing_loss"]) > 0 for v in logged.values())
    assert (tmp_path / "ft" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"

    # the expert-parallel training checkpoint exports to a Qwen3-MoE folder transformers loads
    from safetensors.torch import load_file

    from tools import convert_mcore_to_hf

    hf = tmp_path / "export"
    convert_mcore_to_hf.main(
        ["--load", str(tmp_path / "ft"), "--save", str(hf), "--format", "ar", "--dtype", "fp32",
         "--architecture", str(converted / "sdar_architecture.json")]
    )  # fmt: skip
    exported = {}
    for f in hf.glob("*.safetensors"):
        exported.update(load_file(f))
    saved = tensors(tmp_path / "ft" / "iter_0000003", tmp_path)
    fc2 = saved["decoder.layers.mlp.experts.experts.linear_fc2.weight"]  # [layer, expert, h, ffn]
    assert torch.equal(exported["model.layers.1.mlp.experts.3.down_proj.weight"], fc2[1, 3].float())
    model = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(8).unsqueeze(0)).logits).all()


def test_settings_problems_stop_before_any_model_with_one_message(corpus, tmp_path):
    """Weights named by ``--finetune --load`` that are not there, two SDAR settings that cannot work
    and a warmup as long as the run (2 of 2 iterations, which Megatron asserts on): one message lists
    all four, exit status 2, no traceback, nothing built."""
    (tmp_path / "empty").mkdir()  # e.g. a conversion killed before it wrote its checkpoint
    flags = [*MODEL, *LOOP, *corpus["data"], "--sdar-mask-token-id", corpus["mask"], "--train-iters", "2"]
    flags += ["--finetune", "--load", str(tmp_path / "empty")]
    flags += ["--sdar-block-size", "5", "--sdar-noise-eps", "2"]
    proc = run_training(flags)
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    message = proc.stderr[proc.stderr.index("error: invalid settings (4 to fix):") :].splitlines()
    assert len(message) == 5
    assert message[1].startswith(f"  - --finetune --load {tmp_path / 'empty'}: ")
    assert "no Megatron checkpoint" in message[1]
    assert "not a multiple of the SDAR block size 5" in message[2] and "--sdar-noise-eps" in message[3]
    assert "the learning-rate warmup (2 iterations) must end before the decay does (2" in message[4]
    assert "initializing torch distributed" not in proc.stdout and "number of parameters" not in proc.stdout


LOGGED = {*METRICS, "data tokens/s"}  # what the forward step reports, printed and written alike


def wandb_history(run_dir: Path) -> dict[int, dict[str, float]]:
    """The history rows of an offline W&B run, by step, read from its ``run-*.wandb`` file (records
    in LevelDB's log format: 32 KiB blocks of chunks with a 7-byte header, after a 7-byte file header)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    rows, pos, pending = {}, 7, b""
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:  # the rest of a block too short for a header is padding
            pos += room
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record.FromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                       for item in record.history.item}  # fmt: skip
                rows.setdefault(int(row.get("_step", -1)), {}).update(row)
    return rows


@pytest.fixture(scope="module")
def logged_run(corpus, tmp_path_factory):
    """One short run with ``--tensorboard-dir`` and, when wandb is installed, ``--wandb-project``
    (offline, everything under the test's folder)."""
    if importlib.util.find_spec("tensorboard") is None:  # W&B too is written only beside TensorBoard
        pytest.fail("tensorboard is not installed (in the dev and logging extras): pip install tensorboard")
    work = tmp_path_factory.mktemp("logging")
    flags = [*MODEL, *LOOP, *corpus["data"], "--sdar-mask-token-id", corpus["mask"], "--sdar-block-size", "4"]
    flags += ["--train-iters", "3", "--eval-interval", "3", "--eval-iters", "1"]
    flags += ["--tensorboard-dir", str(work / "tensorboard")]
    env = {}
    if importlib.util.find_spec("wandb") is not None:
        flags += ["--wandb-project", "sdar-test", "--wandb-exp-name", "tiny", "--wandb-save-dir", str(work)]
        env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(work / "config"),
               "WANDB_CACHE_DIR": str(work / "cache"), "WANDB_DATA_DIR": str(work / "data")}  # fmt: skip
    return {"log": train(flags, env=env), "work": work}


def test_tensorboard_gets_what_the_console_log_prints(logged_run):
    """The event files (read with TensorBoard's own reader) hold every metric the console prints,
    under the same names, with the same values, plus their validation figures."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logged_run["work"] / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    reported = {tag for tag in tags if f"{tag} validation" in tags}  # the forward step's report
    assert reported == LOGGED
    printed = iterations(logged_run["log"])
    assert sorted(printed) == [1, 2, 3] and LOGGED <= set(printed[3])
    for key in LOGGED:
        written = {e.step: e.value for e in events.Scalars(key)}
        assert sorted(written) == [1, 2, 3], key
        # iteration 1 and 3 are printed on their own (Megatron folds 1 into the report of 2)
        for it in (1, 3):
            assert written[it] == pytest.approx(float(printed[it][key]), rel=1e-5, abs=1e-9), (key, it)
    checked = validation(logged_run["log"], 3)
    for key in METRICS:
        first = events.Scalars(f"{key} validation")[0]
        assert first.step == 3 and first.value == pytest.approx(float(checked[key]), rel=1e-5, abs=1e-9)


def test_wandb_offline_run_gets_the_same_metrics(logged_run):
    if importlib.util.find_spec("wandb") is None:
        pytest.skip("wandb is not installed (the logging extra)")
    (run_dir,) = (logged_run["work"] / "wandb").glob("offline-run-*")
    history = wandb_history(run_dir)
    printed = iterations(logged_run["log"])
    assert {1, 2, 3} <= set(history)
    for key in LOGGED:
        assert history[3][key] == pytest.approx(float(printed[3][key]), rel=1e-5, abs=1e-9), key
    assert LOGGED <= set(history[1]) and {f"{key} validation" for key in LOGGED} <= set(history[3])


def test_mask_embedding_noise_changes_the_first_steps_and_resumes_exactly(corpus, tmp_path):
    """``--sdar-mask-embedding-noise-std 1 --sdar-mask-embedding-noise-iters 3`` in Megatron's loop:
    the log shows the std the forward step handed the model for the first 3 steps and 0 after (that
    the model applies it is ``tests/test_embedding_noise.py``), and a run resumed from iteration 2
    (noise still on for its first step) logs and validates what the uninterrupted run did."""
    sdar = ["--sdar-mask-token-id", corpus["mask"], "--sdar-block-size", "4"]
    base = [*MODEL, *LOOP, *corpus["data"], *sdar, "--train-iters", "4", "--save-interval", "2",
            "--eval-interval", "4"]  # fmt: skip
    noise = ["--sdar-mask-embedding-noise-std", "1.0", "--sdar-mask-embedding-noise-iters", "3"]
    straight = train([*base, *noise, "--save", str(tmp_path / "a")])
    resumed = train(
        [*base, *noise, "--load", str(tmp_path / "a"), "--ckpt-step", "2", "--save", str(tmp_path / "b")]
    )
    whole, after = iterations(straight), iterations(resumed)
    assert [float(whole[it]["mask emb noise"]) for it in (1, 2, 3, 4)] == [1.0, 1.0, 1.0, 0.0]
    assert sorted(after) == [3, 4]
    assert {k: after[3][k] for k in METRICS} == {k: whole[3][k] for k in METRICS}
    assert validation(resumed, 4) == validation(straight, 4)


def test_pipeline_and_context_parallel_training_match_one_process(corpus, tmp_path):
    """From the same weights (``--finetune`` from one checkpoint), Megatron's loop at PP=2 (plain and
    interleaved, two virtual stages per rank) and at CP=2 logs the losses, gradient norms and
    validation of one process: the stages exchange [x_t ; x_0] (2L positions, not the --seq-length
    Megatron sizes its sends from), and each CP rank trains on its chunks of both halves (with the
    distributed optimizer, and saves its checkpoint)."""
    sdar = ["--sdar-mask-token-id", corpus["mask"], "--sdar-block-size", "4"]
    base = [*MODEL, *LOOP, *corpus["data"], *sdar, "--train-iters", "3", "--eval-interval", "3"]
    base += ["--eval-iters", "1", "--lr-warmup-iters", "1", "--num-layers", "4"]
    train([*base, "--save", str(tmp_path / "start"), "--save-interval", "3"])
    finetune = [*base, "--load", str(tmp_path / "start"), "--finetune"]
    reference = train(finetune)
    expected = iterations(reference)
    assert sorted(expected) == [1, 2, 3]
    # with Megatron's distributed optimizer, sharded over the data- and context-parallel ranks
    cp_run = ["--context-parallel-size", "2", "--use-distributed-optimizer"]
    cp_run += ["--save", str(tmp_path / "cp"), "--save-interval", "3"]
    for extra in (
        ["--pipeline-model-parallel-size", "2"],
        ["--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "2"],
        cp_run,
    ):
        out = train([*finetune, *extra], nproc=2)
        logged = iterations(out)
        assert sorted(logged) == [1, 2, 3], extra
        for it in logged:
            for key in ("lm loss", "masked ce", "grad norm"):
                want = float(expected[it][key])
                assert float(logged[it][key]) == pytest.approx(want, rel=2e-5), (extra, it, key)
        got, want = validation(out, 3), validation(reference, 3)
        assert {k: pytest.approx(float(v), rel=2e-5) for k, v in want.items()} == {
            k: float(v) for k, v in got.items()
        }, extra
    assert (tmp_path / "cp" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
