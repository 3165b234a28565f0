"""GPU: the whole SDAR model with FlexAttention matches the SDPA path, and activation recompute
matches no recompute (see tests/gpu_model_worker.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_flex_sdpa_and_recompute_agree():
    from tests.helpers import free_port

    env = dict(os.environ, PYTHONPATH=str(ROOT), MASTER_PORT=str(free_port()))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.gpu_model_worker"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(result)
    assert result["flex_vs_sdpa"]["loss_diff"] < 2e-2
    assert result["flex_vs_sdpa"]["max_rel_grad_diff"] < 5e-2
    assert result["split_vs_sdpa"]["loss_diff"] < 2e-2
    assert result["split_vs_sdpa"]["max_rel_grad_diff"] < 5e-2
    assert result["masked_output"]["loss_diff"] < 1e-3
    assert result["masked_output"]["max_rel_grad_diff"] < 2e-2
    assert result["pinned_loss_index"]
    assert result["host_syncs"] == {"flex": [], "split": []}, result["host_syncs"]
    for key in ("full_recompute", "selective_recompute"):
        assert result[key]["loss_diff"] < 1e-6, result
        assert result[key]["max_rel_grad_diff"] < 1e-2, result
        assert result[key]["mask_builds"] == 1, result  # the replay reuses the forward's mask
