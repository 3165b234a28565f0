"""Parallel equivalence over gloo in subprocesses: TP=2, PP=2 and DP=2 equal one process (loss and
gradients) through Megatron's forward-backward schedule, with the same weights and micro-batches.
DP=2 with unequal token counts per rank checks that the loss normaliser is global."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent


def _worker(*args: str, timeout: int = 240) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.Popen(
        [sys.executable, "-m", "tests.parallel_worker", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _last_json(out: str) -> dict:
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"worker printed no result:\n{out}")


def _run_reference(path: Path, extra: list[str]) -> dict:
    proc = _worker("--phase", "ref", "--ref", str(path), *extra)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-4000:]
    return _last_json(out)


def _run_parallel(path: Path, tp: int, pp: int, extra: list[str], world: int | None = None) -> list[dict]:
    if world is None:  # every process of the case's layout (data parallelism fills up to 2)
        world = max(2, tp * pp * _cp_of(extra))
    port = str(free_port())
    procs = [
        _worker(
            "--phase", "par", "--ref", str(path), "--tp", str(tp), "--pp", str(pp),
            "--rank", str(rank), "--world-size", str(world), "--port", port, *extra,
        )
        for rank in range(world)
    ]  # fmt: skip
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode in (0, 1), err[-4000:]
        results.append(_last_json(out))
    return results


# SFT-style positions (restarting per document), the output layer on the masked positions, the joint
# AR loss (token-causal clean half) and the mask-embedding noise, together
SFT_LIKE = ["--position-ids", "document", "--masked-output", "--clean-attention", "causal",
            "--ar-loss-weight", "0.5", "--embedding-noise", "0.5"]  # fmt: skip

# flags (with their values) of the parallel phase only: the reference runs one process without them
PARALLEL_ONLY = {"--sp": 0, "--masked-output": 0, "--ep": 1, "--etp": 1, "--vpp": 1, "--cp": 1}


def _reference_key(extra: list[str]) -> tuple[str, ...]:
    """The flags that change the one-process reference (cases differing only in parallel-phase
    flags share it)."""
    kept, i = [], 0
    while i < len(extra):
        if extra[i] in PARALLEL_ONLY:
            i += 1 + PARALLEL_ONLY[extra[i]]
            continue
        kept.append(extra[i])
        i += 1
    return tuple(kept)


def _cp_of(extra: list[str]) -> int:
    return int(extra[extra.index("--cp") + 1]) if "--cp" in extra else 1


CASES = {
    "tp2": (2, 1, []),
    "tp2-tied-causal-clean": (2, 1, ["--tied", "--clean-attention", "causal"]),
    "tp2-sequence-parallel": (2, 1, ["--sp"]),
    "tp2-sequence-parallel-tied": (2, 1, ["--sp", "--tied"]),
    "moe-ep2": (1, 1, ["--moe", "--ep", "2"]),
    # the Qwen3-30B-A3B layout in miniature: attention split by TP with sequence parallelism,
    # whole experts spread by EP over the same ranks (expert tensor parallelism 1)
    "moe-tp2-sp-ep2-etp1": (2, 1, ["--moe", "--sp", "--ep", "2", "--etp", "1"]),
    # experts split by tensor parallelism too (ETP = TP = 2, EP = 1)
    "moe-tp2-sp-etp2": (2, 1, ["--moe", "--sp", "--etp", "2"]),
    # the output layer on the masked positions only (the index padded and split over TP ranks)
    "tp2-sequence-parallel-tied-masked-output": (2, 1, ["--sp", "--tied", "--masked-output"]),
    # noise on the mask token's embedding, drawn for the whole sequence and sliced per SP rank
    "tp2-sequence-parallel-embedding-noise": (2, 1, ["--sp", "--embedding-noise", "0.5"]),
    "pp2": (1, 2, []),
    "pp2-masked-output": (1, 2, ["--masked-output"]),
    "pp2-virtual-stages": (1, 2, ["--vpp", "2"]),
    "dp2-masked-normalizer": (1, 1, ["--loss-normalizer", "masked"]),
    # context parallelism: each rank holds chunks r and 2cp-1-r of both halves; documents and blocks
    # (counted per document) cross the chunk boundaries of these 32-token windows
    # with full recompute, which replays the key/value gather in backward
    "cp2-full-recompute": (1, 1, ["--cp", "2", "--recompute"]),
    "cp2-sft-positions-masked-output-ar-noise": (1, 1, ["--cp", "2", *SFT_LIKE]),
    "cp2-tp2-sequence-parallel": (2, 1, ["--cp", "2", "--sp"]),
    "cp2-pp2": (1, 2, ["--cp", "2"]),
    "cp2-moe-ep2": (1, 1, ["--cp", "2", "--moe", "--ep", "2"]),
}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """One-process references by :func:`_reference_key`, each run once: ``key -> (path, result)``."""
    folder, found = tmp_path_factory.mktemp("references"), {}

    def get(extra: list[str]) -> tuple[Path, dict]:
        key = _reference_key(extra)
        if key not in found:
            path = folder / f"ref{len(found)}.pt"
            found[key] = (path, _run_reference(path, list(key)))
        return found[key]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_parallel_matches_single_process(case: str, references) -> None:
    tp, pp, extra = CASES[case]
    ref_path, reference = references(extra)
    results = _run_parallel(ref_path, tp, pp, extra)
    for result in results:
        assert result["failures"] == [], result
    losses = [r["loss"] for r in results if "loss" in r]
    assert losses, "no rank reported the loss"
    for loss in losses:
        assert loss == pytest.approx(reference["loss"], rel=1e-5)
