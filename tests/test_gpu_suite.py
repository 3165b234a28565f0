"""benchmarks/gpu_suite.py on CPU: the plan, the budget, failed and hung stages, the JSON written
before and after every stage, the environment block and the parsers of the benchmarks' output."""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import gpu_suite
from benchmarks.gpu_suite import Context, Stage

ROOT = Path(__file__).resolve().parent.parent
ORDER = ["gpu-tests", "attention-check", "t1-4096", "step", "t1-8192", "step-flex"]


def context(tmp_path, **settings) -> Context:
    args = argparse.Namespace(t1_batch=1, step_micro_batch=2, check_length=1024, **settings)
    return Context(python=sys.executable, data_dir=tmp_path, args=args)


def python_stage(name: str, code: str, estimate_s: float = 0, limit_s: float = 30, parse=None) -> Stage:
    return Stage(name, name, estimate_s, limit_s, lambda ctx: [ctx.python, "-c", code], parse)


def test_dry_run_lists_every_stage_in_order_with_its_command(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert gpu_suite.main(["--dry-run", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    positions = [text.index(f". {name}: ") for name in ORDER]
    assert positions == sorted(positions), text
    commands = [line.strip() for line in text.splitlines() if line.startswith("   ")]
    assert len(commands) == len(ORDER)
    assert commands[0].endswith("-m pytest -q -m gpu -p no:cacheprovider tests/")
    assert "benchmarks/attention.py --check" in commands[1]
    for i, seq_len in ((2, 4096), (4, 8192)):
        assert f"--seq-lengths {seq_len} --block-sizes 4" in commands[i]
        assert "--backends flex split split-tiles --fa4" in commands[i]
    assert "benchmarks/train_step.py --objectives sdar ar --micro-batch-sizes 2" in commands[3]
    assert "--objectives sdar --micro-batch-sizes 2" in commands[5]
    assert not out.exists()  # a plan runs nothing and writes nothing


def test_stages_option_selects_and_orders(tmp_path, capsys):
    gpu_suite.main(["--dry-run", "--out", str(tmp_path / "r.json"), "--stages", "t1-4096", "gpu-tests"])
    text = capsys.readouterr().out
    assert "1. t1-4096: " in text and "2. gpu-tests: " in text and "step" not in text


def test_tiny_budget_skips_every_stage_and_still_writes_valid_json(tmp_path, capsys):
    out = tmp_path / "results" / "gpu_suite.json"
    assert gpu_suite.main(["--budget-s", "1", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["finished"] is True
    assert [s["name"] for s in results["stages"]] == ORDER
    for stage in results["stages"]:
        assert stage["status"] == "skipped", stage
        assert stage["reason"].startswith("budget: "), stage
    env = results["environment"]
    assert env["python"] == platform.python_version()
    assert {"torch", "triton", "megatron-core", "transformers"} <= set(env["versions"])
    printed = capsys.readouterr().out
    assert "skipped" in printed and f"wrote {out}" in printed


def test_out_defaults_to_the_out_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_suite.parse_args([]).out == tmp_path / "gpu_suite.json"
    monkeypatch.delenv("OUT")
    assert str(gpu_suite.parse_args([]).out) == "gpu_suite.json"


def test_failed_and_hung_stages_are_recorded_and_the_suite_goes_on(tmp_path):
    """The hung stage's own child holds the output pipe: only killing the whole process group ends it
    within its limit."""
    out = tmp_path / "r.json"
    hang = "import subprocess, sys; print('started', flush=True); subprocess.run([sys.executable, '-c', 'import time; time.sleep(60)'])"  # noqa: E501
    stages = [
        python_stage("fails", "import sys; print('boom'); sys.exit(3)"),
        python_stage("hangs", hang, limit_s=1.5),
        python_stage(
            "passes", "print('2 failed, 10 passed, 1 skipped in 3.2s')", parse=gpu_suite.parse_pytest
        ),
        python_stage("too-dear", "print('never')", estimate_s=10_000),
    ]
    t0 = time.monotonic()
    results = gpu_suite.run_suite(stages, context(tmp_path), 600, out, environment={"probe": "skipped"})
    assert time.monotonic() - t0 < 8
    by_name = {s["name"]: s for s in json.loads(out.read_text())["stages"]}
    assert by_name == {s["name"]: s for s in results["stages"]}
    assert by_name["fails"]["status"] == "failed" and by_name["fails"]["reason"] == "exit code 3: boom"
    assert "boom" in by_name["fails"]["output_tail"]
    assert by_name["hangs"]["status"] == "failed" and by_name["hangs"]["reason"].startswith("timed out")
    assert by_name["hangs"]["seconds"] < 5 and "started" in by_name["hangs"]["output_tail"]
    assert by_name["passes"]["status"] == "ok"
    assert by_name["passes"]["figures"]["passed"] == 10 and by_name["passes"]["figures"]["failed"] == 2
    assert by_name["too-dear"]["status"] == "skipped" and "estimated 10000 s" in by_name["too-dear"]["reason"]
    log = out.with_suffix(".log").read_text()
    assert "boom" in log and "started" in log and "10 passed" in log
    table = gpu_suite.table(results)
    assert "exit code 3" in table and "timed out" in table


def test_budget_left_is_the_timeout_and_later_stages_see_less(tmp_path, monkeypatch):
    """A fake clock: each stage costs 100 s of a 250 s budget; a stage runs with the budget left (or
    its own limit) as its timeout and is skipped once less than its estimate is left."""
    now = [0.0]
    timeouts = []

    def fake_run(argv, timeout, log_file):
        timeouts.append(timeout)
        now[0] += 100.0
        return 0, "", False

    monkeypatch.setattr(gpu_suite, "run_command", fake_run)
    stages = [
        python_stage(f"s{i}", "pass", estimate_s=60, limit_s=limit) for i, limit in enumerate([900, 120, 900])
    ]
    results = gpu_suite.run_suite(
        stages, context(tmp_path), 250, tmp_path / "r.json", {}, clock=lambda: now[0]
    )
    assert [s["status"] for s in results["stages"]] == ["ok", "ok", "skipped"]
    assert timeouts == [250, 120]  # all that is left; then the stage's own limit (150 s were left)
    assert results["stages"][2]["reason"] == "budget: 50 s left, estimated 60 s"
    assert results["elapsed_s"] == 200


def test_json_is_rewritten_before_and_after_each_stage(tmp_path):
    """A running stage reads the results file: the stage before is recorded as done, itself as
    running and the next as pending."""
    out = tmp_path / "r.json"
    read = f"import json; print([s['status'] for s in json.load(open({str(out)!r}))['stages']])"
    stages = [
        python_stage("first", "print('hi')"),
        python_stage("reader", read, parse=lambda ctx, log: {"seen": log.strip()}),
        python_stage("last", "pass"),
    ]
    results = gpu_suite.run_suite(stages, context(tmp_path), 600, out, environment={})
    assert results["stages"][1]["figures"]["seen"] == "['ok', 'running', 'pending']"
    assert not list(tmp_path.glob(".r.json.tmp*"))  # no temporary file left beside it


def test_an_interrupted_suite_records_the_stage_it_was_running(tmp_path, monkeypatch):
    calls = []

    def interrupted_second_time(argv, timeout, log_file):
        calls.append(argv)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return 0, "", False

    monkeypatch.setattr(gpu_suite, "run_command", interrupted_second_time)
    out = tmp_path / "r.json"
    stages = [python_stage(f"s{i}", "pass") for i in range(3)]
    gpu_suite.run_suite(stages, context(tmp_path), 600, out, environment={})
    results = json.loads(out.read_text())
    assert results["interrupted"] is True and results["finished"] is False
    assert [s["status"] for s in results["stages"]] == ["ok", "failed", "pending"]
    assert results["stages"][1]["reason"].startswith("interrupted")


def test_sigterm_stops_the_running_stage_and_leaves_the_json(tmp_path):
    """The suite as a process, stopped from outside while a stage runs (as `timeout` does); the
    stages' interpreter is a stand-in that hangs (it runs the environment probe's ``-c`` code)."""
    out = tmp_path / "r.json"
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\n[ "$1" = -c ] && exec {sys.executable} "$@"\nexec sleep 60\n')
    python.chmod(0o755)
    argv = [sys.executable, "benchmarks/gpu_suite.py", "--out", str(out), "--python", str(python)]
    proc = subprocess.Popen(
        [*argv, "--stages", "gpu-tests"], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # wait until the stage is running
        try:
            if json.loads(out.read_text())["stages"][0]["status"] == "running":
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130, output
    assert "interrupted" in output  # the closing table was printed
    stage = json.loads(out.read_text())["stages"][0]
    assert stage["status"] == "failed" and stage["reason"].startswith("interrupted"), stage


def test_environment_probe(tmp_path):
    env = gpu_suite.probe_environment(sys.executable)
    assert env["python"] == platform.python_version()
    assert set(env["versions"]) >= {"torch", "triton", "megatron-core", "transformers", "flash-attn-4"}
    assert ("torch" in env) != ("torch_error" in env)  # either torch's CUDA facts or why not
    assert "megatron.core" in env["importable"] and "flash_attn.cute" in env["importable"]


def check_json(split_diff: float) -> dict:
    """attention.py --check output: every path exact but split, whose dq is off by split_diff."""
    diff = {"max_abs_diff": 0.001, "max_abs_ref": 1.0}
    paths = ("library", "direct", "split", "split-tiles")
    check = {
        f"{clean}/{path}": {
            t: dict(diff, max_abs_diff=split_diff) if (path, t) == ("split", "dq") else dict(diff)
            for t in ("out", "dq", "dk", "dv")
        }
        for clean in ("block_causal", "causal")
        for path in paths
    }
    return {"config": {"tolerance": 0.02}, "check": check}


def t1_line(backend: str, sdar_ms: float, causal_ms: float = 4.0) -> str:
    """A row as benchmarks/attention.py prints it (its format string)."""
    seq_len, block, ratio, mask_ms, density, tiles = 4096, 4, sdar_ms / causal_ms, 1.5, 0.2, 0.27
    return (
        f"{seq_len:>6} {block:>4} {backend:>11} {sdar_ms:>9.3f} {causal_ms:>10.3f} "
        f"{ratio:>7.3f} {mask_ms:>8.3f} {density:>8.3f} {tiles:>7.3f}"
    )


def test_best_backend_is_the_fastest_that_passed_the_check(tmp_path):
    ctx = context(tmp_path)
    assert gpu_suite.best_backend(ctx)[0] == "flex"  # nothing measured: the default
    (tmp_path / "attention_check.json").write_text(json.dumps(check_json(split_diff=0.5)))
    ctx.records["attention-check"] = {"figures": gpu_suite.parse_check(ctx, "")}
    assert ctx.records["attention-check"]["figures"]["backend_ok"] == {
        "flex": True, "split": False, "split-tiles": True,
    }  # fmt: skip
    # t1-4096 killed before writing its JSON: the rows come from its printed output
    log = "\n".join(["header", t1_line("flex", 4.2), t1_line("split", 2.0), t1_line("split-tiles", 2.5)])
    figures = gpu_suite.t1_parse(4096)(ctx, log)
    assert figures["source"] == "log" and [r["backend"] for r in figures["rows"]] == [
        "flex",
        "split",
        "split-tiles",
    ]
    assert figures["rows"][1]["sdar_ms"] == 2.0 and figures["rows"][1]["L"] == 4096
    ctx.records["t1-4096"] = {"figures": figures}
    assert gpu_suite.best_backend(ctx)[0] == "split-tiles"  # split is faster but failed the check
    argv = gpu_suite.step_command(None)(ctx)
    assert argv[argv.index("--objectives") + 1 :][:2] == ["sdar-split", "ar"]
    assert argv[argv.index("--split-band") + 1] == "tiles"
    (tmp_path / "attention_check.json").write_text(json.dumps(check_json(split_diff=0.001)))
    ctx.records["attention-check"] = {"figures": gpu_suite.parse_check(ctx, "")}
    assert gpu_suite.best_backend(ctx)[0] == "split"
    assert "--split-band" not in gpu_suite.step_command(None)(ctx)


def test_step_rows_are_read_from_the_log_when_the_json_is_missing(tmp_path):
    # as train_step.format_row prints them: objective mbs L ms tokens/s TFLOP/s MFU% peak GiB
    log = "objective  mbs      L ...\n      sdar    2   4096     413.6      19805    431.2   43.6     47.9\n"
    log += "        ar    2   4096     241.6      33902    397.6   40.2     31.3\n"
    figures = gpu_suite.step_parse("step")(context(tmp_path), log)
    assert [(r["objective"], r["micro_batch"]) for r in figures["rows"]] == [("sdar", 2), ("ar", 2)]
    assert abs(figures["rows"][0]["mfu"] - 0.436) < 1e-9
    record = {"name": "step", "status": "ok", "backend": "flex", "figures": figures}
    assert gpu_suite.summarize(record).startswith("[flex] sdar mbs2 MFU 43.6%")


def test_t1_figures_from_the_json_with_fa4_rows(tmp_path):
    ctx = context(tmp_path)
    rows = [dict(L=4096, B=4, backend="flex", sdar_ms=4.4, causal_ms=4.0, ratio=1.1)]
    fa4 = [{"L": 4096, "causal_ms": 4.0, "skipped": "flash_attn.cute (package flash-attn-4) not importable"}]
    (tmp_path / "t1_4096.json").write_text(json.dumps({"rows": rows, "fa4_causal": fa4}))
    figures = gpu_suite.t1_parse(4096)(ctx, "no rows printed")
    assert figures == {"rows": rows, "fa4_causal": fa4, "source": "json"}
    line = gpu_suite.summarize({"name": "t1-4096", "status": "ok", "figures": figures})
    assert line == "causal 4.00 ms; flex 1.10x (4.40 ms), fa4-causal skipped"
