"""The SDAR block-diffusion loss (Eq. 7) in the shape Megatron's schedules expect.

``loss = sum over masked noised positions i of CE(logits_i, x_0[i]) / p_i``, normalised by the number
of eligible (default) or masked tokens. The loss function returns the *sum* and the token count;
with ``--calculate-per-token-loss`` Megatron all-reduces the count across micro-batches and
data-parallel ranks and divides gradients by it, so the normaliser is global. The weights ``1/p``
stay inside the sum: passing them as a loss mask would turn the token count into a sum of weights.
"""

from __future__ import annotations

import torch

from megatron_sdar.batch import SDARBatch
from megatron_sdar.config import LossNormalizer

CE_INDEX = 0
CORRECT_INDEX = 1


def sdar_loss(
    output: torch.Tensor,
    batch: SDARBatch,
    normalizer: LossNormalizer | str = LossNormalizer.ELIGIBLE,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss_sum, num_tokens, report)`` from the model's ``[b, L, 2]`` (CE, correct) output.

    Report entries are ``[sum, count]`` pairs, which Megatron's training loop sums over micro-batches
    and data-parallel ranks before dividing, so every logged figure is a global token average.
    """
    normalizer = LossNormalizer(normalizer)
    ce = output[..., CE_INDEX].float()
    correct = output[..., CORRECT_INDEX].detach().float()
    masked = batch.masked.float()
    eligible = batch.eligible.float()

    loss_sum = (ce * masked / batch.mask_prob).sum()
    num_masked = masked.sum()
    num_eligible = eligible.sum()
    count = num_eligible if normalizer is LossNormalizer.ELIGIBLE else num_masked
    num_tokens = count.to(torch.int)

    detached = loss_sum.detach()
    report = {
        "lm loss": torch.stack([detached, count]),
        "masked ce": torch.stack([(ce.detach() * masked).sum(), num_masked]),
        "masked acc": torch.stack([(correct * masked).sum(), num_masked]),
        "mean t": torch.stack([(batch.t * eligible).sum(), num_eligible]),
    }
    return loss_sum, num_tokens, report
