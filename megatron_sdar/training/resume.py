"""Learning-rate schedule settings a run cannot start with, found before any model is built.

Megatron checks the schedule only when it builds it (a warmup at least as long as the decay) or when
it loads a checkpoint's (every value must equal this run's unless told otherwise), each time with a
bare ``AssertionError`` deep in the training setup. Both are decided by the flags and the arguments a
``torch_dist`` checkpoint stores, so they are checked here with the settings' other problems, saying
what to change.
"""

from __future__ import annotations

import os
from typing import Any

# what Megatron's scheduler compares on load: (its name, the flags that set it)
_COMPARED = (
    ("learning rate", "--lr"),
    ("minimum learning rate", "--min-lr"),
    ("warmup iterations", "--lr-warmup-iters/--lr-warmup-fraction"),
    ("total number of iterations", "--lr-decay-iters (default --train-iters)"),
    ("learning rate decay style", "--lr-decay-style"),
    ("start weight decay", "--start-weight-decay/--weight-decay"),
    ("end weight decay", "--end-weight-decay/--weight-decay"),
    ("total number of weight decay iterations", "--train-iters"),
)


def scheduler_values(args: Any) -> dict[str, Any] | None:
    """The values Megatron's ``OptimizerParamScheduler`` is built with for ``args`` (iteration-based
    training), under the names its checkpoint comparison uses; ``None`` for sample-based runs."""
    train_iters = getattr(args, "train_iters", None)
    if not train_iters:
        return None
    batch = _batch(args)
    decay = (getattr(args, "lr_decay_iters", None) or train_iters) * batch
    fraction = getattr(args, "lr_warmup_fraction", None)
    warmup = fraction * decay if fraction is not None else (getattr(args, "lr_warmup_iters", 0) or 0) * batch
    weight_decay = getattr(args, "weight_decay", None)
    start_wd = getattr(args, "start_weight_decay", None)
    end_wd = getattr(args, "end_weight_decay", None)
    return {
        "learning rate": args.lr,
        "minimum learning rate": getattr(args, "min_lr", 0.0),
        "warmup iterations": warmup,
        "total number of iterations": decay,
        "learning rate decay style": getattr(args, "lr_decay_style", None),
        "start weight decay": weight_decay if start_wd is None else start_wd,
        "end weight decay": weight_decay if end_wd is None else end_wd,
        "total number of weight decay iterations": train_iters * batch,
    }


def _batch(args: Any) -> int:
    """Samples per iteration (Megatron's validation sets ``--global-batch-size``; before it, at one
    data-parallel rank, it is the micro-batch size)."""
    return getattr(args, "global_batch_size", None) or getattr(args, "micro_batch_size", None) or 1


def warmup_problems(args: Any) -> list[str]:
    """A warmup that does not end before the decay does (Megatron asserts on it)."""
    values = scheduler_values(args)
    if values is None or getattr(args, "lr", None) is None:
        return []
    batch = _batch(args)
    warmup, decay = values["warmup iterations"], values["total number of iterations"]
    if warmup < decay:
        return []
    return [
        f"the learning-rate warmup ({warmup / batch:g} iterations) must end before the decay does "
        f"({decay // batch} iterations: --lr-decay-iters, default --train-iters): lower "
        "--lr-warmup-iters (or --lr-warmup-fraction) or train longer"
    ]


def checkpoint_args(args: Any) -> tuple[str, Any] | None:
    """``(path, the arguments it stores)`` of the checkpoint a resume (``--load`` without
    ``--finetune``) starts from; ``None`` when there is none, or it is not a readable ``torch_dist``
    checkpoint of a training run (Megatron reports those when it loads them)."""
    load = getattr(args, "load", None)
    if not load or getattr(args, "finetune", False) or "://" in load:
        return None
    from megatron_sdar.conversion.megatron import resolve_checkpoint

    step = getattr(args, "ckpt_step", None)
    try:
        path = resolve_checkpoint(load, None if step is None else str(step))
    except ValueError:
        return None
    if os.path.basename(path) == "release":
        return None  # Megatron starts a release checkpoint at iteration 0
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict

    try:
        recorded = load_common_state_dict(path).get("args")
    except Exception:  # an unreadable checkpoint is Megatron's to report when it loads it
        return None
    return None if recorded is None else (path, recorded)


def scheduler_resume_problems(args: Any, found: tuple[str, Any] | None = None) -> list[str]:
    """A resume whose learning-rate schedule differs from the checkpoint's, which Megatron refuses
    on load unless ``--override-opt-param-scheduler`` (this run's values) or
    ``--use-checkpoint-opt-param-scheduler`` (the checkpoint's) says which to use."""
    if (
        getattr(args, "override_opt_param_scheduler", False)
        or getattr(args, "use_checkpoint_opt_param_scheduler", False)
        or getattr(args, "no_load_optim", False)
    ):
        return []
    found = found if found is not None else checkpoint_args(args)
    if found is None:
        return []
    path, recorded = found
    ours, theirs = scheduler_values(args), scheduler_values(recorded)
    if ours is None or theirs is None:
        return []
    batch = _batch(args)
    steps = {"warmup iterations", "total number of iterations", "total number of weight decay iterations"}
    differ = []
    for name, flags in _COMPARED:
        a, b = ours[name], theirs[name]
        if a != b:
            if name in steps:  # samples, as Megatron compares them; shown in this run's iterations
                a, b = f"{a / batch:g}", f"{b / batch:g}"
            differ.append(f"{name} ({flags}): {b} in the checkpoint, {a} now")
    if not differ:
        return []
    return [
        f"--load {args.load} ({os.path.basename(path)}): the learning-rate schedule differs from the "
        "checkpoint's, which Megatron refuses when it loads it:\n"
        + "\n".join(f"- {d}" for d in differ)
        + "\npass --override-opt-param-scheduler to use this run's values, "
        "--use-checkpoint-opt-param-scheduler to keep the checkpoint's, or the checkpoint's flags"
    ]
