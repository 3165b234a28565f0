#!/usr/bin/env python3
"""Train SDAR block-diffusion LMs (or the AR baseline) with Megatron-Core's training loop.

    torchrun --nproc-per-node 8 pretrain_sdar.py <Megatron flags> --sdar-mask-token-id 151669 \\
        --calculate-per-token-loss --position-embedding-type rope ...

Megatron's own flags keep their meaning (parallelism, optimizer, checkpoints, logging); the
``--sdar-*`` group (``python pretrain_sdar.py --help``) selects the objective and its settings.
Settings the run cannot start with (the ``--sdar-*`` checks, a ``--finetune --load`` folder without
a checkpoint, flags that disagree with a converted checkpoint, a resume whose block-size schedule
differs from the checkpoint's, W&B without TensorBoard) are listed together in one message before
any model is built, and the run exits with status 2.
"""

from __future__ import annotations

import os
import sys

from megatron_sdar import compat

compat.ignore_known_warnings()  # the megatron-core / torch notices named there, nothing else


def _extra_args(parser):
    """Add the ``--sdar-*`` group; also escape stray ``%`` in Megatron's own help texts, which
    otherwise make ``--help`` crash in megatron-core 0.19.2 (:func:`compat.escape_percent_in_help`)."""
    from megatron_sdar.training.arguments import add_sdar_args

    compat.escape_percent_in_help(parser)
    return add_sdar_args(parser)


def settings_problems(args, tokenizer) -> list[str]:
    """Everything that stops this run before a model is built, all at once: the checkpoint to start
    from, logging, the ``--sdar-*`` settings, and the flags against a converted checkpoint."""
    from megatron_sdar.conversion.megatron import check_checkpoint_architecture
    from megatron_sdar.schedule import resume_problems as schedule_resume_problems
    from megatron_sdar.training.arguments import logging_problems, sdar_problems, start_checkpoint_problems
    from megatron_sdar.training.resume import scheduler_resume_problems, warmup_problems

    special = {"end-of-document": tokenizer.eod}
    pad = getattr(tokenizer, "pad", None)
    if isinstance(pad, int) and pad >= 0 and pad != tokenizer.eod:
        special["padding"] = pad
    problems = start_checkpoint_problems(args) + logging_problems(args)
    problems += sdar_problems(args, vocab_size=args.padded_vocab_size, special_tokens=special)
    problems += schedule_resume_problems(args)  # the checkpoint's --sdar-block-size-schedule
    problems += warmup_problems(args) + scheduler_resume_problems(args)  # the learning-rate schedule
    for checkpoint in (args.load, getattr(args, "pretrained_checkpoint", None)):
        try:
            check_checkpoint_architecture(checkpoint, args)
        except ValueError as err:
            problems.append(str(err))
    return problems


def refuse(problems: list[str]) -> None:
    """Stop with one message listing every problem (once per node) and exit status 2, no traceback."""
    from megatron_sdar.training.arguments import describe_problems

    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print(f"error: {describe_problems(problems)}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def main() -> None:
    from megatron.core.enums import ModelType
    from megatron.training import get_tokenizer, pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    from megatron_sdar.training.arguments import fresh_start_notice
    from megatron_sdar.training.datasets import train_valid_test_datasets_provider
    from megatron_sdar.training.model_provider import model_provider
    from megatron_sdar.training.step import SDARForwardStep

    compat.use_shipped_dataset_helpers()  # the wheel ships them compiled, not their sources
    args = parse_and_validate_args(extra_args_provider=_extra_args)
    problems = settings_problems(args, get_tokenizer())
    if problems:
        refuse(problems)
    notice = fresh_start_notice(args)
    if notice and args.rank == 0:
        print(notice, flush=True)
    pretrain(
        pretrain_cfg_container_from_args(args, None),
        train_valid_test_datasets_provider,
        ModelType.encoder_or_decoder,
        SDARForwardStep(),
        model_provider=model_provider,
    )


if __name__ == "__main__":
    main()
