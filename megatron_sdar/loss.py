"""The SDAR block-diffusion loss (Eq. 7) in the shape Megatron's schedules expect.

``loss = sum over masked noised positions i of CE(logits_i, x_0[i]) / p_i``, normalised by the number
of eligible (default) or masked tokens. The loss function returns the *sum* and the token count;
with ``--calculate-per-token-loss`` Megatron all-reduces the count across micro-batches and
data-parallel ranks and divides gradients by it, so the normaliser is global. The weights ``1/p``
stay inside the sum: passing them as a loss mask would turn the token count into a sum of weights.

The joint AR + diffusion loss (``--sdar-ar-loss-weight W``) adds ``W`` times the mean next-token
cross-entropy of the clean half (token-causal there, see :class:`~megatron_sdar.model.SDARModel`):

    total = diffusion_sum / diffusion_count + W * ar_sum / ar_count

Megatron divides the summed ``loss_sum`` by the summed ``num_tokens`` (over micro-batches and
data-parallel ranks), one normaliser for everything the loss function returns. The diffusion part
keeps it (``num_tokens`` is its count, as without the AR loss); the AR part is pre-divided by its own
count and multiplied back by the diffusion count *of the same micro-batch*:
``loss_sum = diffusion_sum + W * ar_sum * diffusion_count / ar_count``. Summed and divided globally,
that is exactly ``diffusion_mean + W * ar_mean`` when the ratio of the two counts is the same in
every micro-batch (one micro-batch, or CPT windows, where the AR targets are the eligible tokens less
one per document); otherwise each micro-batch's AR mean is weighted by its share of the diffusion
count rather than of the AR count. The global normaliser of the whole step is not known while a
micro-batch runs, so this is the closest the one-normaliser interface allows. The logged
``diffusion loss`` and ``ar loss`` are exact global means either way (each its own ``[sum, count]``).
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_sdar.batch import SDARBatch
from megatron_sdar.config import LossNormalizer
from megatron_sdar.masks import LAYOUT_DOC

CE_INDEX = 0
CORRECT_INDEX = 1
AR_CE_INDEX = 2  # with the AR loss: the clean half's next-token cross-entropy
AR_CORRECT_INDEX = 3


def next_token_targets(
    labels: torch.Tensor, layout: torch.Tensor, eligible: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(targets, valid)``, both ``[b, L]``: clean position ``i`` predicts ``targets[:, i]`` =
    ``labels[:, i + 1]`` where ``valid``.

    A target is valid when the next token is in the same document (row 0 of the ``[b, 2 or 3, L]``
    layout) and eligible. So no target crosses a document boundary or enters padding (its own
    pseudo-document, never eligible); the end-of-document token is predicted as its document's last
    token (it belongs to the document it closes, :func:`~megatron_sdar.masks.document_ids_from_eod`),
    and the token after it is not predicted from it; the last position of a window has no target. In
    SFT only response tokens are targets (the last prompt token predicts the first response token).
    Under ``--sdar-document-mask global`` the layout holds no document boundaries, which is why the AR
    loss refuses that mask. Targets where not valid are ``labels`` values (any vocabulary id), so
    the cross-entropy there is finite and masked out.
    """
    docs = layout[:, LAYOUT_DOC]
    targets = torch.roll(labels, shifts=-1, dims=-1)
    valid = torch.zeros_like(eligible, dtype=torch.bool)
    valid[:, :-1] = (docs[:, 1:] == docs[:, :-1]) & eligible[:, 1:].to(torch.bool)
    return targets, valid


def sdar_loss(
    output: torch.Tensor,
    batch: SDARBatch,
    normalizer: LossNormalizer | str = LossNormalizer.ELIGIBLE,
    ar_weight: float = 0.0,
    ar_valid: torch.Tensor | None = None,
    count_group: Any = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss_sum, num_tokens, report)`` from the model's ``[b, L, 2]`` (CE, correct) output.

    Report entries are ``[sum, count]`` pairs, which Megatron's training loop sums over micro-batches
    and data-parallel ranks before dividing, so every logged figure is a global token average.

    With ``ar_weight > 0`` the output is ``[b, L, 4]`` (the clean half's next-token CE and correct
    follow) and the AR loss is added as the module docstring says: ``lm loss`` is then the total,
    ``diffusion loss`` and ``ar loss`` (and ``ar acc``) its parts. ``ar_weight = 0`` is the
    diffusion loss alone, computed exactly as without the option. ``ar_valid``: where the clean half
    has a next-token target (default: derived from ``batch``, which must then be whole). Under
    context parallelism each rank holds part of every window: ``count_group`` (the context-parallel
    group) sums the counts that weigh the AR part over it, so the weight is the whole window's.
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
    if not ar_weight:
        return loss_sum, num_tokens, report
    if output.shape[-1] <= AR_CORRECT_INDEX:
        raise ValueError(
            f"the AR loss needs the model's [b, L, 4] output (pass ar_labels), got {list(output.shape)}"
        )
    if ar_valid is None:
        ar_valid = next_token_targets(batch.labels, batch.layout, batch.eligible)[1]
    valid = ar_valid.float()
    ar_ce = output[..., AR_CE_INDEX].float()
    ar_sum = (ar_ce * valid).sum()
    num_ar = valid.sum()
    counts = torch.stack([count, num_ar])
    if count_group is not None:
        torch.distributed.all_reduce(counts, group=count_group)
    total = loss_sum + (ar_weight * counts[0] / counts[1].clamp_min(1.0)) * ar_sum
    report["lm loss"] = torch.stack([total.detach(), count])
    report["diffusion loss"] = torch.stack([detached, count])
    report["ar loss"] = torch.stack([ar_sum.detach(), num_ar])
    ar_correct = output[..., AR_CORRECT_INDEX].detach().float()
    report["ar acc"] = torch.stack([(ar_correct * valid).sum(), num_ar])
    return total, num_tokens, report
