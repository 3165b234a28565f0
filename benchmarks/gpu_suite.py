#!/usr/bin/env python3
"""Every GPU check of the project in one command, in order of value, within a time budget.

Made for a lent GPU machine whose time comes in short slices: one command runs, in this order,

1. ``gpu-tests``: ``python -m pytest -q -m gpu -p no:cacheprovider tests/``;
2. ``attention-check``: every SDAR attention back end (flex through the library and directly,
   split, split-tiles) against ``scaled_dot_product_attention`` with the dense SDAR mask, output
   and gradients (``benchmarks/attention.py --check``);
3. ``t1-4096``: T1 at L=4096, SDAR block size 4: each back end against causal flash attention over
   the same 2L tokens (``benchmarks/attention.py``);
4. ``step``: the training step (T2/T3, ``benchmarks/train_step.py``) of the SDAR objective with
   the fastest back end of ``t1-4096`` that passed ``attention-check`` (flex when there is none),
   and of the AR baseline, at micro-batch 2;
5. ``t1-8192``: T1 at L=8192;
6. ``step-flex``: the SDAR step with FlexAttention (the current default) in the same run, for a
   before/after pair; skipped when ``step`` already used flex.

Each stage runs as a subprocess whose timeout is the smaller of the budget left and the stage's own
limit, so a hung stage cannot take the whole budget; a stage is skipped, with the reason recorded,
when less budget is left than its estimated cost. A stage that fails or times out is recorded as
failed and the suite goes on. The JSON (``--out``) is rewritten atomically before and after every
stage, so a run killed from outside still leaves what it measured; the output of every stage is
appended to a log next to it (``<out>.log``). At the end one table is printed.

The JSON holds ``environment`` (GPU name, driver, CUDA, Python and the versions of torch, triton,
megatron-core, transformers, flash-attn-4 and nvidia-cutlass-dsl) and one entry per stage:
``status`` (ok, failed, skipped, or pending/running in a killed run), ``reason``, ``seconds``,
``command``, ``returncode``, ``figures`` (parsed) and the tail of its output.

Usage::

    python benchmarks/gpu_suite.py --dry-run                      # the plan and commands (any machine)
    python benchmarks/gpu_suite.py --budget-s 480 --out $OUT/gpu_suite.json
    python benchmarks/gpu_suite.py --stages attention-check t1-4096  # a subset, in the order given

See ``docs/gpu_runs.md`` for running it on a machine without network access.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from megatron_sdar.atomic import atomic_write_text  # noqa: E402  (pure Python, no torch)

# The library back ends of benchmarks/attention.py, and the paths its --check reports for them.
BACKENDS = ("flex", "split", "split-tiles")
CHECK_PATHS = {"flex": ("library", "direct"), "split": ("split",), "split-tiles": ("split-tiles",)}
# train_step.py objective (and extra flags) that runs the SDAR objective with a given back end
STEP_OBJECTIVES = {
    "flex": ("sdar", []),
    "split": ("sdar-split", []),
    "split-tiles": ("sdar-split", ["--split-band", "tiles"]),
}
DEFAULT_BACKEND = "flex"
LOG_TAIL = 3000  # characters of each stage's output kept in the JSON


def default_out() -> Path:
    return Path(os.environ["OUT"]) / "gpu_suite.json" if os.environ.get("OUT") else Path("gpu_suite.json")


# ---------------------------------------------------------------------------------------------------
# stages


@dataclass
class Context:
    """What the stages share: the interpreter, a folder for their raw outputs, the settings and the
    records of the stages run so far (``records[name]``)."""

    python: str
    data_dir: Path
    args: argparse.Namespace
    records: dict[str, dict] = field(default_factory=dict)


@dataclass
class Stage:
    name: str
    title: str
    estimate_s: float  # typical cost on one H100/H200 (compilation included); less left: skipped
    limit_s: float  # the most it may run, even when more budget is left
    command: Callable[[Context], list[str]]
    parse: Callable[[Context, str], dict] | None = None
    # a reason to skip it given the stages before (None: run it)
    skip_if: Callable[[Context], str | None] | None = None


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def pytest_command(ctx: Context) -> list[str]:
    return [ctx.python, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/"]


def parse_pytest(ctx: Context, log: str) -> dict:
    """Counts from pytest's closing line, e.g. ``3 failed, 12 passed, 1 skipped in 95.1s``."""
    figures = {}
    for line in reversed(log.splitlines()):
        counts = re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)", line)
        if counts:
            figures = {("error" if kind.startswith("error") else kind): int(n) for n, kind in counts}
            break
    figures["failed_tests"] = re.findall(r"^(?:FAILED|ERROR) (\S+)", log, re.MULTILINE)[:50]
    return figures


def check_command(ctx: Context) -> list[str]:
    return [
        ctx.python, "benchmarks/attention.py", "--check", "--check-length", str(ctx.args.check_length),
        "--out", str(ctx.data_dir / "attention_check.json"),
    ]  # fmt: skip


def parse_check(ctx: Context, log: str) -> dict:
    """Per back end: whether every tensor is within the tolerance, and the worst relative error."""
    data = _json(ctx.data_dir / "attention_check.json")
    if data is None:
        return {}
    tolerance = data.get("config", {}).get("tolerance", 2e-2)
    paths: dict[str, dict] = {}
    for key, diffs in data.get("check", {}).items():
        path = key.split("/", 1)[1]
        entry = paths.setdefault(path, {"ok": True, "max_rel_diff": 0.0})
        for d in diffs.values():
            rel = d["max_abs_diff"] / max(d["max_abs_ref"], 1e-30)
            entry["max_rel_diff"] = max(entry["max_rel_diff"], rel)
            entry["ok"] &= d["max_abs_diff"] <= tolerance * d["max_abs_ref"]
    backends = {b: all(paths.get(p, {}).get("ok", False) for p in ps) for b, ps in CHECK_PATHS.items()}
    return {"tolerance": tolerance, "paths": paths, "backend_ok": backends, "raw": data}


def t1_command(seq_len: int) -> Callable[[Context], list[str]]:
    def command(ctx: Context) -> list[str]:
        return [
            ctx.python, "benchmarks/attention.py", "--seq-lengths", str(seq_len), "--block-sizes", "4",
            "--batch", str(ctx.args.t1_batch), "--backends", *BACKENDS, "--fa4",
            "--out", str(ctx.data_dir / f"t1_{seq_len}.json"),
        ]  # fmt: skip

    return command


# a row attention.py prints: L B backend sdar_ms causal_ms ratio mask_ms density tiles
T1_KEYS = ("L", "B", "backend", "sdar_ms", "causal_ms", "ratio", "mask_ms", "density", "tile_density")
T1_ROW = re.compile(
    r"^\s*(\d+)\s+(\d+)\s+([a-z0-9-]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$"
)


def _number(text: str) -> int | float | str:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def t1_parse(seq_len: int) -> Callable[[Context, str], dict]:
    def parse(ctx: Context, log: str) -> dict:
        data = _json(ctx.data_dir / f"t1_{seq_len}.json")
        if data is not None:
            return {"rows": data.get("rows", []), "fa4_causal": data.get("fa4_causal", []), "source": "json"}
        # killed before it wrote its JSON: the rows it printed
        rows = [
            dict(zip(T1_KEYS, map(_number, m.groups()))) for m in map(T1_ROW.match, log.splitlines()) if m
        ]
        return {"rows": rows, "source": "log"}

    return parse


def best_backend(ctx: Context) -> tuple[str, str]:
    """The fastest back end of ``t1-4096`` among those that passed ``attention-check``, and why."""
    check = ctx.records.get("attention-check", {})
    passed = check.get("figures", {}).get("backend_ok")
    rows = ctx.records.get("t1-4096", {}).get("figures", {}).get("rows", [])
    if not rows:
        return DEFAULT_BACKEND, f"t1-4096 gave no rows: {DEFAULT_BACKEND}, the default"
    timed = {r["backend"]: r["sdar_ms"] for r in rows if r.get("backend") in BACKENDS}
    if passed is not None:
        timed = {b: ms for b, ms in timed.items() if passed.get(b)}
    if not timed:
        return DEFAULT_BACKEND, f"no back end of t1-4096 passed attention-check: {DEFAULT_BACKEND}"
    best = min(timed, key=timed.get)
    checked = "passed attention-check" if passed is not None else "attention-check did not run"
    return best, f"fastest in t1-4096 ({timed[best]:.3f} ms fwd+bwd; {checked})"


def step_command(backend: str | None) -> Callable[[Context], list[str]]:
    """``backend=None``: the best back end of t1-4096, with the AR baseline."""

    def command(ctx: Context) -> list[str]:
        chosen = best_backend(ctx)[0] if backend is None else backend
        objective, extra = STEP_OBJECTIVES[chosen]
        objectives = [objective, "ar"] if backend is None else [objective]
        name = "step" if backend is None else f"step-{backend}"
        return [
            ctx.python, "benchmarks/train_step.py", "--objectives", *objectives, "--micro-batch-sizes",
            str(ctx.args.step_micro_batch), *extra, "--out", str(ctx.data_dir / f"{name}.json"),
        ]  # fmt: skip

    return command


# a row train_step.py prints: objective mbs L ms tokens/s TFLOP/s MFU% peak
STEP_ROW = re.compile(
    r"^\s*([a-z-]+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$"
)


def step_parse(name: str) -> Callable[[Context, str], dict]:
    def parse(ctx: Context, log: str) -> dict:
        data = _json(ctx.data_dir / f"{name}.json")
        if data is not None:
            return {"rows": data.get("rows", []), "summary": data.get("summary", {}), "source": "json"}
        rows = []
        for m in map(STEP_ROW.match, log.splitlines()):
            if m:
                obj, mbs, seq, ms, tps, tflops, mfu, peak = m.groups()
                rows.append(dict(objective=obj, micro_batch=int(mbs), seq_length=int(seq), ms=float(ms),
                                 data_tokens_per_s=float(tps), tflops=float(tflops), mfu=float(mfu) / 100,
                                 peak_gib=float(peak)))  # fmt: skip
        return {"rows": rows, "source": "log"}

    return parse


def skip_flex_step(ctx: Context) -> str | None:
    if ctx.records.get("step", {}).get("backend") == "flex":
        return "step already ran the SDAR objective with flex"
    return None


def default_stages() -> list[Stage]:
    # name, title, estimate s, limit s, command, parser (estimates: guesses for one H100/H200 with
    # compilation, the first run on a machine; the limits keep a hung stage from taking the budget)
    return [
        Stage("gpu-tests", "GPU tests (pytest -m gpu)", 120, 300, pytest_command, parse_pytest),
        Stage("attention-check", "each back end vs dense-mask SDPA", 45, 180, check_command, parse_check),
        Stage("t1-4096", "T1 at L=4096 B=4 vs causal flash", 60, 200, t1_command(4096), t1_parse(4096)),
        Stage("step", "T2/T3: SDAR (best back end), AR", 120, 300, step_command(None), step_parse("step")),
        Stage("t1-8192", "T1 at L=8192 B=4 vs causal flash", 60, 200, t1_command(8192), t1_parse(8192)),
        Stage("step-flex", "T3: SDAR with flex (before/after)", 75, 200, step_command("flex"),
              step_parse("step-flex"), skip_flex_step),
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# environment

ENV_PROBE = r"""
import importlib.metadata as md, importlib.util, json, platform, shutil, subprocess, sys
info = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform()}
versions = {}
for dist in ("torch", "triton", "megatron-core", "transformers", "flash-attn-4", "nvidia-cutlass-dsl",
             "numpy"):
    try:
        versions[dist] = md.version(dist)
    except md.PackageNotFoundError:
        versions[dist] = None
info["versions"] = versions
importable = {}
for mod in ("megatron.core", "flash_attn.cute"):
    try:
        importable[mod] = importlib.util.find_spec(mod) is not None
    except ModuleNotFoundError:
        importable[mod] = False
    except Exception as exc:
        importable[mod] = f"{type(exc).__name__}: {exc}"[:300]
info["importable"] = importable
try:
    import torch
    info["torch"] = torch.__version__
    info["cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_count"] = torch.cuda.device_count()
        info["capability"] = list(torch.cuda.get_device_capability(0))
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cudnn"] = torch.backends.cudnn.version()
except Exception as exc:
    info["torch_error"] = f"{type(exc).__name__}: {exc}"[:300]
if shutil.which("nvidia-smi"):
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
        if out:
            info["nvidia_smi"] = out[0]
            info["driver"] = out[0].rsplit(",", 1)[-1].strip()
    except Exception as exc:
        info["nvidia_smi_error"] = str(exc)[:200]
print(json.dumps(info))
"""


def probe_environment(python: str, timeout: float = 90) -> dict:
    """Versions, GPU, CUDA and driver, read by ``python`` in a subprocess (a broken CUDA set-up is
    recorded, not raised)."""
    env = {"created": datetime.now(UTC).isoformat(timespec="seconds")}
    try:
        proc = subprocess.run(
            [python, "-c", ENV_PROBE], capture_output=True, text=True, timeout=timeout, cwd=ROOT
        )
        env.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    except (subprocess.TimeoutExpired, ValueError, IndexError, OSError) as exc:
        env["probe_error"] = f"{type(exc).__name__}: {exc}"[:500]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT, timeout=10
        )
        if commit.returncode == 0:
            env["commit"] = commit.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return env


# ---------------------------------------------------------------------------------------------------
# running


def run_command(argv: list[str], timeout: float, log_file) -> tuple[int | None, str, bool]:
    """Run ``argv`` in its own process group from the repository root, its output echoed and logged.
    Returns (exit code or None, output, timed out); on time-out the whole group is killed."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            errors="replace", bufsize=1, start_new_session=True,
        )  # fmt: skip
    except OSError as exc:
        return None, f"could not start: {exc}", False
    chunks: list[str] = []

    def pump() -> None:
        for line in proc.stdout:
            chunks.append(line)
            sys.stdout.write(line)
            sys.stdout.flush()
            log_file.write(line)
            log_file.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=max(timeout, 0.1))
    except BaseException as exc:  # time-out, or the suite itself interrupted: end the stage's group
        timed_out = isinstance(exc, subprocess.TimeoutExpired)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        if not timed_out:
            raise
    reader.join(timeout=10)
    return proc.returncode, "".join(chunks), timed_out


def write_results(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(results, indent=1, default=str) + "\n")


def run_suite(
    stages: list[Stage],
    ctx: Context,
    budget_s: float,
    out: Path,
    environment: dict | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> dict:
    """Run ``stages`` in order within ``budget_s`` seconds (counted from the call), recording each in
    the JSON at ``out`` (rewritten after every change) and its output in ``<out>.log``."""
    start = clock()
    results = {
        "suite": "benchmarks/gpu_suite.py",
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "budget_s": budget_s,
        "elapsed_s": 0.0,
        "finished": False,
        "environment": environment if environment is not None else probe_environment(ctx.python),
        "stages": [
            {"name": s.name, "title": s.title, "status": "pending", "estimate_s": s.estimate_s}
            for s in stages
        ],
    }
    log_path = out.with_name(out.name + ".log") if out.suffix != ".json" else out.with_suffix(".log")

    def save() -> None:
        results["elapsed_s"] = round(clock() - start, 1)
        write_results(results, out)

    save()
    try:
        with open(log_path, "a") as log_file:
            for stage, record in zip(stages, results["stages"]):
                ctx.records[stage.name] = record
                run_stage(stage, record, ctx, budget_s - (clock() - start), clock, save, log_file)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM under main(): record it, keep what was measured
        for record in results["stages"]:
            if record["status"] == "running":
                record.update(status="failed", reason="interrupted: the suite was stopped")
        results["interrupted"] = True
        save()
        return results
    results["finished"] = True
    save()
    return results


def run_stage(stage: Stage, record: dict, ctx: Context, left: float, clock, save, log_file) -> None:
    """Run, skip or fail one stage with ``left`` seconds of budget, updating its ``record``."""
    reason = stage.skip_if(ctx) if stage.skip_if else None
    if reason is None and left < stage.estimate_s:
        reason = f"budget: {max(left, 0):.0f} s left, estimated {stage.estimate_s:.0f} s"
    if reason is not None:
        record.update(status="skipped", reason=reason, seconds=0.0)
        save()
        print(f"== {stage.name}: skipped ({reason})", flush=True)
        return
    try:
        argv = stage.command(ctx)
    except Exception as exc:  # a broken plan fails this stage, not the suite
        record.update(status="failed", reason=f"no command: {type(exc).__name__}: {exc}", seconds=0.0)
        save()
        return
    if stage.name == "step":
        record["backend"], record["backend_reason"] = best_backend(ctx)
    elif stage.name == "step-flex":
        record["backend"] = "flex"
    timeout = min(left, stage.limit_s)
    record.update(status="running", command=shlex.join(argv), timeout_s=round(timeout, 1))
    save()
    banner = f"== {stage.name}: {shlex.join(argv)}  (timeout {timeout:.0f} s)"
    print(banner, flush=True)
    log_file.write(banner + "\n")
    log_file.flush()
    t0 = clock()
    rc, output, timed_out = run_command(argv, timeout, log_file)
    record["seconds"] = round(clock() - t0, 1)
    record["returncode"] = rc
    if timed_out:
        record.update(status="failed", reason=f"timed out after {timeout:.0f} s")
    elif rc == 0:
        record.update(status="ok", reason="")
    else:
        last = next((line.strip() for line in reversed(output.splitlines()) if line.strip()), "")
        record.update(
            status="failed", reason=f"exit code {rc}: {last[:200]}" if rc is not None else output[:300]
        )
    if stage.parse is not None:
        try:
            record["figures"] = stage.parse(ctx, output)
        except Exception as exc:  # figures that cannot be read are a note, not a crash
            record["figures"] = {"parse_error": f"{type(exc).__name__}: {exc}"[:300]}
    record["output_tail"] = output[-LOG_TAIL:]
    save()


# ---------------------------------------------------------------------------------------------------
# report


def summarize(record: dict) -> str:
    """The key figures of one stage, in one line."""
    figures = record.get("figures") or {}
    name = record["name"]
    if name == "gpu-tests":
        counts = [f"{figures[k]} {k}" for k in ("passed", "failed", "error", "skipped") if figures.get(k)]
        return ", ".join(counts)
    if name == "attention-check" and "paths" in figures:
        return ", ".join(
            f"{p} {'ok' if d['ok'] else 'FAIL'} {d['max_rel_diff']:.1e}" for p, d in figures["paths"].items()
        )
    if name.startswith("t1-") and figures.get("rows"):
        parts = [f"{r['backend']} {r['ratio']:.2f}x ({r['sdar_ms']:.2f} ms)" for r in figures["rows"]]
        for r in figures.get("fa4_causal", []):
            parts.append(f"fa4-causal {r['ratio']:.2f}x" if "ratio" in r else "fa4-causal skipped")
        causal = figures["rows"][0]["causal_ms"]
        return f"causal {causal:.2f} ms; " + ", ".join(parts)
    if name.startswith("step") and figures.get("rows"):
        parts = []
        for r in figures["rows"]:
            if "ms" in r:
                parts.append(f"{r['objective']} mbs{r['micro_batch']} MFU {100 * r['mfu']:.1f}% "
                             f"{r['data_tokens_per_s']:,.0f} tok/s")  # fmt: skip
            else:
                parts.append(f"{r.get('objective')} {'OOM' if r.get('oom') else r.get('error', '?')[:60]}")
        prefix = f"[{record['backend']}] " if record.get("backend") else ""
        return prefix + ", ".join(parts)
    return ""


def table(results: dict) -> str:
    env = results.get("environment", {})
    versions = env.get("versions", {})
    head = " | ".join(
        [env.get("gpu", "no GPU"), f"driver {env.get('driver', '?')}", f"CUDA {env.get('cuda', '?')}",
         f"Python {env.get('python', '?')}", *(f"{k} {v}" for k, v in versions.items() if v)]
    )  # fmt: skip
    lines = [head, f"{'stage':<16} {'status':<8} {'s':>6}  figures / reason", "-" * 100]
    for r in results["stages"]:
        seconds = f"{r['seconds']:.0f}" if "seconds" in r else "-"
        detail = summarize(r)
        if r["status"] != "ok" and r.get("reason"):
            detail = f"{r['reason']}" + (f"; {detail}" if detail else "")
        lines.append(f"{r['name']:<16} {r['status']:<8} {seconds:>6}  {detail}")
    lines.append(f"elapsed {results['elapsed_s']:.0f} s of a {results['budget_s']:.0f} s budget")
    return "\n".join(lines)


def plan_text(stages: list[Stage], ctx: Context, budget_s: float, out: Path) -> str:
    lines = [f"budget {budget_s:.0f} s; results: {out} (log: {out.with_suffix('.log')})"]
    total = 0.0
    for i, stage in enumerate(stages, 1):
        total += stage.estimate_s
        argv = stage.command(ctx)
        note = ""
        if stage.name == "step":
            note = "   # SDAR objective: the fastest correct back end of t1-4096 (flex if none), then ar"
        if stage.name == "step-flex":
            note = "   # skipped when step already used flex"
        fits = "within" if total <= budget_s else "BEYOND"
        lines.append(
            f"{i}. {stage.name}: {stage.title} (estimate {stage.estimate_s:.0f} s, limit "
            f"{stage.limit_s:.0f} s; {total:.0f} s in: {fits} the budget)"
        )
        lines.append(f"   {shlex.join(argv)}{note}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    names = [s.name for s in default_stages()]
    p = argparse.ArgumentParser(
        description="All GPU checks (tests, attention correctness, T1, T2/T3 step) in one budgeted run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget for all stages")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results JSON (default: $OUT/gpu_suite.json, or ./gpu_suite.json)",
    )
    p.add_argument("--dry-run", "--plan", action="store_true", help="print the stages and commands only")
    p.add_argument("--stages", nargs="+", choices=names, default=None, help="run only these, in this order")
    p.add_argument("--python", default=sys.executable, help="interpreter for the stages")
    p.add_argument("--t1-batch", type=int, default=1, help="batch of the T1 measurement (docs: 1)")
    p.add_argument("--step-micro-batch", type=int, default=2, help="micro-batch of the step stages")
    p.add_argument("--check-length", type=int, default=1024, help="clean window L of attention-check")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = default_out()
    if args.budget_s <= 0:
        p.error("--budget-s must be positive")
    return args


def select(stages: list[Stage], names: list[str] | None) -> list[Stage]:
    if not names:
        return stages
    by_name = {s.name: s for s in stages}
    return [by_name[n] for n in dict.fromkeys(names)]


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stages = select(default_stages(), args.stages)
    with tempfile.TemporaryDirectory(prefix="gpu_suite-") as data_dir:
        ctx = Context(python=args.python, data_dir=Path(data_dir), args=args)
        if args.dry_run:
            print(plan_text(stages, ctx, args.budget_s, args.out))
            return 0
        previous = signal.signal(signal.SIGTERM, _interrupt)  # `timeout` and job control send it
        try:
            results = run_suite(stages, ctx, args.budget_s, args.out)
        finally:
            signal.signal(signal.SIGTERM, previous)
    print()
    print(table(results))
    print(f"wrote {args.out}")
    if results.get("interrupted"):
        return 130
    return 0 if all(r["status"] != "failed" for r in results["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main())
