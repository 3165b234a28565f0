"""The learning-rate schedule's problems found before any model is built: a warmup that does not end
before the decay, and a resume whose schedule differs from the checkpoint's (each of which Megatron
meets with a bare assertion deep in its setup). The refusal through ``pretrain_sdar.py`` for a real
checkpoint is in ``tests/test_train_loop.py``."""

from __future__ import annotations

import copy

import pytest

from megatron_sdar.training.resume import scheduler_resume_problems, scheduler_values, warmup_problems
from tests.test_training import parse


def test_warmup_must_end_before_the_decay(monkeypatch):
    ok = parse(["--lr", "1e-4", "--train-iters", "10", "--lr-warmup-iters", "9"], monkeypatch)
    assert warmup_problems(ok) == []
    for flags, shown in (
        (
            ["--train-iters", "10", "--lr-warmup-iters", "10"],
            "(10 iterations) must end before the decay does (10",
        ),
        (["--train-iters", "10", "--lr-decay-iters", "5", "--lr-warmup-iters", "6"], "(6 iterations)"),
    ):
        problems = warmup_problems(parse(["--lr", "1e-4", *flags], monkeypatch))
        assert len(problems) == 1 and shown in problems[0], problems


def test_a_resume_with_another_schedule_names_what_differs(monkeypatch):
    recorded = parse(["--train-iters", "10", "--lr-warmup-iters", "2"], monkeypatch)
    found = ("/ckpt/iter_0000005", recorded)
    same = copy.deepcopy(recorded)
    same.load = "/ckpt"
    assert scheduler_resume_problems(same, found) == []
    longer = parse(["--train-iters", "20", "--lr-warmup-iters", "2", "--load", "/ckpt"], monkeypatch)
    (problem,) = scheduler_resume_problems(longer, found)
    assert "--load /ckpt (iter_0000005): the learning-rate schedule differs" in problem
    assert (
        "total number of iterations (--lr-decay-iters (default --train-iters)): 10 in the checkpoint, 20 now"
        in problem
    )
    assert "total number of weight decay iterations (--train-iters): 10 in the checkpoint, 20 now" in problem
    assert "learning rate (--lr)" not in problem and "--override-opt-param-scheduler" in problem
    for escape in (
        "--override-opt-param-scheduler",
        "--use-checkpoint-opt-param-scheduler",
        "--no-load-optim",
    ):
        told = parse(["--train-iters", "20", "--load", "/ckpt", escape], monkeypatch)
        assert scheduler_resume_problems(told, found) == [], escape
    other_lr = parse(
        ["--train-iters", "10", "--lr-warmup-iters", "2", "--load", "/ckpt", "--lr", "5e-4"], monkeypatch
    )
    (problem,) = scheduler_resume_problems(other_lr, found)
    assert f"learning rate (--lr): {recorded.lr} in the checkpoint, 0.0005 now" in problem


def test_sample_based_runs_are_left_to_megatron():
    class Args:
        train_iters = None

    assert scheduler_values(Args()) is None and warmup_problems(Args()) == []


@pytest.mark.parametrize("finetune", [True, False])
def test_no_checkpoint_no_problem(tmp_path, monkeypatch, finetune):
    flags = ["--train-iters", "10", "--load", str(tmp_path)] + (["--finetune"] if finetune else [])
    assert scheduler_resume_problems(parse(flags, monkeypatch)) == []
