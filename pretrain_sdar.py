#!/usr/bin/env python3
"""Train SDAR block-diffusion LMs (or the AR baseline) with Megatron-Core's training loop.

    torchrun --nproc-per-node 8 pretrain_sdar.py <Megatron flags> --sdar-mask-token-id 151669 \\
        --calculate-per-token-loss --position-embedding-type rope ...

Megatron's own flags keep their meaning (parallelism, optimizer, checkpoints, logging); the
``--sdar-*`` group (``python pretrain_sdar.py --help``) selects the objective and its settings.
"""

from __future__ import annotations

from megatron_sdar import compat

compat.ignore_known_warnings()  # the megatron-core / torch notices named there, nothing else


def _extra_args(parser):
    """Add the ``--sdar-*`` group; also escape stray ``%`` in Megatron's own help texts, which
    otherwise make ``--help`` crash in megatron-core 0.19.2 (:func:`compat.escape_percent_in_help`)."""
    from megatron_sdar.training.arguments import add_sdar_args

    compat.escape_percent_in_help(parser)
    return add_sdar_args(parser)


def main() -> None:
    from megatron.core.enums import ModelType
    from megatron.training import get_tokenizer, pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    from megatron_sdar.conversion.megatron import check_checkpoint_architecture
    from megatron_sdar.training.arguments import validate_sdar_args
    from megatron_sdar.training.datasets import train_valid_test_datasets_provider
    from megatron_sdar.training.model_provider import model_provider
    from megatron_sdar.training.step import SDARForwardStep

    compat.use_shipped_dataset_helpers()  # the wheel ships them compiled, not their sources
    args = parse_and_validate_args(extra_args_provider=_extra_args)
    tokenizer = get_tokenizer()
    special = {"end-of-document": tokenizer.eod}
    pad = getattr(tokenizer, "pad", None)
    if isinstance(pad, int) and pad >= 0 and pad != tokenizer.eod:
        special["padding"] = pad
    validate_sdar_args(args, vocab_size=args.padded_vocab_size, special_tokens=special)
    for checkpoint in (args.load, getattr(args, "pretrained_checkpoint", None)):
        check_checkpoint_architecture(checkpoint, args)
    pretrain(
        pretrain_cfg_container_from_args(args, None),
        train_valid_test_datasets_provider,
        ModelType.encoder_or_decoder,
        SDARForwardStep(),
        model_provider=model_provider,
    )


if __name__ == "__main__":
    main()
