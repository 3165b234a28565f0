#!/usr/bin/env python3
"""Train SDAR block-diffusion LMs (or the AR baseline) with Megatron-Core's training loop.

    torchrun --nproc-per-node 8 pretrain_sdar.py <Megatron flags> --sdar-mask-token-id 151669 \\
        --calculate-per-token-loss --position-embedding-type rope ...

Megatron's own flags keep their meaning (parallelism, optimizer, checkpoints, logging); the
``--sdar-*`` group (``python pretrain_sdar.py --help``) selects the objective and its settings.
"""

from __future__ import annotations

import warnings

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed.*")


def _use_shipped_dataset_helpers() -> None:
    """megatron-core's wheel ships the compiled dataset helpers but not their sources; Megatron's
    initialisation would try to rebuild them with ``make`` and exit. Check they import instead."""
    import megatron.core.datasets.utils as dataset_utils

    def check_helpers() -> None:
        try:
            from megatron.core.datasets import helpers_cpp  # noqa: F401
        except ImportError as err:
            raise RuntimeError(
                "megatron-core's compiled dataset helpers (helpers_cpp) are missing; reinstall "
                "megatron-core==0.19.2 from its binary wheel"
            ) from err

    dataset_utils.compile_helpers = check_helpers


def _extra_args(parser):
    """Add the ``--sdar-*`` group; also escape stray ``%`` in Megatron's own help texts, which
    otherwise make ``--help`` crash in megatron-core 0.19.2."""
    from megatron_sdar.training.arguments import add_sdar_args

    for action in parser._actions:
        if action.help:
            try:
                action.help % {}
            except (TypeError, ValueError, KeyError):
                action.help = action.help.replace("%", "%%")
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
    from megatron_sdar.training.step import forward_step

    _use_shipped_dataset_helpers()
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
        forward_step,
        model_provider=model_provider,
    )


if __name__ == "__main__":
    main()
