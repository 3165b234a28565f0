"""The training step Megatron runs per micro-batch: the host-to-device copy of the batch, the
tensor-parallel agreement check, the forward pass and the loss function, for both objectives.
"""

from __future__ import annotations

import weakref
from functools import partial
from typing import Any

import torch

from megatron_sdar.loss import sdar_loss
from megatron_sdar.training.arguments import output_on_masked
from megatron_sdar.training.throughput import METER, REPORT_KEY

SDAR_KEYS = ("input_ids", "position_ids", "layout", "labels", "eligible", "masked", "mask_prob", "t")


_AGREEMENT_CHECKED = weakref.WeakSet()

_AGREEMENT_CHECKED_PLAIN: dict[int, Any] = {}  # iterators without weak references, kept alive


def _first_batch_of(iterator: Any) -> bool:
    """Whether ``iterator`` is seen here for the first time (an iterator is remembered without
    relying on ``id``, which a new object may reuse once the old one is gone)."""
    try:
        if iterator in _AGREEMENT_CHECKED:
            return False
        _AGREEMENT_CHECKED.add(iterator)
    except TypeError:  # e.g. a list iterator: keep it alive so that its id stays its own
        if id(iterator) in _AGREEMENT_CHECKED_PLAIN:
            return False
        _AGREEMENT_CHECKED_PLAIN[id(iterator)] = iterator
    return True


def _check_tensor_parallel_agreement(batch: dict[str, torch.Tensor], iterator: Any) -> None:
    """Once per data iterator: every TP rank read the same micro-batch (one host read).

    Each rank reads its own copy of the data; samples and noise depend on ``(seed, split, index)``
    only, so a disagreement means a dataset that is not deterministic, which would train each
    tensor-parallel shard on different data.
    """
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_world_size() == 1 or not _first_batch_of(iterator):
        return
    digest = torch.stack(
        [batch["input_ids"].sum(), (batch["input_ids"] * batch["position_ids"]).sum(),
         batch["layout"].to(torch.int64).sum(), batch["masked"].sum()]
    )  # fmt: skip
    low, high = digest.clone(), digest.clone()
    group = parallel_state.get_tensor_model_parallel_group()
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN, group=group)
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX, group=group)
    if not torch.equal(low, high):
        raise RuntimeError(
            "tensor-parallel ranks read different micro-batches: the dataset must give the same "
            "sample for the same index on every rank (noise is seeded by --seed, split and index)"
        )


# The fields the masks and RoPE tables are built from, and their device dtypes.
REUSED_KEYS = {"layout": torch.int32, "position_ids": torch.int64}

_LAST: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor, int]] = {}


def _reused(key: str, host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The previous micro-batch's device tensor when ``host`` repeats its contents, else a new copy.

    Masks and RoPE tables are cached per device tensor, so windows with the same packing (for
    example windows inside one long document) share them instead of rebuilding them per
    micro-batch. Comparing on the host costs no device synchronisation.
    """
    last = _LAST.get((key, device))
    if (
        last is not None
        and last[1]._version == last[2]
        and last[0].shape == host.shape
        and last[0].dtype == host.dtype
        and torch.equal(last[0], host)
    ):
        return last[1]
    tensor = host.to(device=device, dtype=REUSED_KEYS[key], non_blocking=True)
    _LAST[(key, device)] = (host, tensor, tensor._version)
    return tensor


def get_sdar_batch(
    data_iterator,
    device: torch.device,
    micro_batch_size: int,
    seq_length: int,
    loss_index: bool = False,
) -> dict:
    """The next SDAR micro-batch on ``device``; with ``loss_index``, also the masked positions for
    :meth:`~megatron_sdar.model.SDARModel.selected_output`.

    Every rank reads its own copy from its data loader (the dataset is built on every rank), so
    nothing is broadcast, and the index of masked positions is built on the host from the loader's
    (pinned) tensors and copied without a device synchronisation, at any tensor-parallel size. The
    layout and positions come back as the previous micro-batch's tensors when they repeat, so
    their masks are not rebuilt.
    """
    b, n = micro_batch_size, seq_length
    shapes = {
        "input_ids": ((b, 2 * n), torch.int64),
        "position_ids": ((b, 2 * n), torch.int64),
        "layout": ((b, 2, n), torch.int32),
        "labels": ((b, n), torch.int64),
        "eligible": ((b, n), torch.bool),
        "masked": ((b, n), torch.bool),
        "mask_prob": ((b, n), torch.float32),
        "t": ((b, n), torch.float32),
    }
    if data_iterator is None:
        raise RuntimeError("this rank has no data iterator; the SDAR datasets are built on every rank")
    host = next(data_iterator)
    for key, (shape, _) in shapes.items():
        if tuple(host[key].shape) != shape:
            raise ValueError(
                f"micro-batch field {key!r} has shape {list(host[key].shape)}, expected {list(shape)} "
                f"from --micro-batch-size {b} and --seq-length {n}"
            )
    out = {
        key: _reused(key, host[key], device)
        if key in REUSED_KEYS
        else host[key].to(device=device, dtype=dtype, non_blocking=True)
        for key, (_, dtype) in shapes.items()
    }
    if host["layout"].device.type == "cpu":  # what is planned on the host reads this copy
        from megatron_sdar.attention.cache import MASK_CACHE

        MASK_CACHE.set_host_copy(out["layout"], host["layout"])
    if loss_index:
        from megatron_sdar.model.sdar import masked_loss_index

        index = masked_loss_index(host["masked"].to(torch.bool))
        if device.type == "cuda" and index.device.type == "cpu":
            index = index.pin_memory()
        out["loss_index"] = index.to(device, non_blocking=True)
    _check_tensor_parallel_agreement(out, data_iterator)
    return out


def forward_step(data_iterator, model) -> tuple[torch.Tensor, Any]:
    """Megatron forward step for both objectives."""
    from megatron.core import parallel_state
    from megatron.training import get_args, get_timers

    from megatron_sdar.batch import SDARBatch

    args = get_args()
    timers = get_timers()
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    timers("batch-generator", log_level=2).start()
    selected = args.sdar_objective == "sdar" and output_on_masked(args)
    data = get_sdar_batch(data_iterator, device, args.micro_batch_size, args.seq_length, loss_index=selected)
    timers("batch-generator").stop()
    batch = SDARBatch(**{k: data[k] for k in SDAR_KEYS})
    throughput = METER.report(
        batch.labels.numel(), model.training, device, parallel_state.get_data_parallel_world_size()
    )
    if args.sdar_objective == "ar":
        output, loss_fn = ar_forward(model, batch)
    else:
        output = model(
            batch.input_ids, batch.position_ids, batch.layout, labels=batch.labels,
            loss_index=data.get("loss_index"),
        )  # fmt: skip
        loss_fn = partial(sdar_loss, batch=batch, normalizer=args.sdar_loss_normalizer)
    return output, partial(_with_throughput, loss_fn, throughput)


def _with_throughput(loss_fn, throughput: torch.Tensor, output: torch.Tensor):
    """Add the ``data tokens/s`` pair to the loss function's report."""
    loss_sum, count, report = loss_fn(output)
    return loss_sum, count, {**report, REPORT_KEY: throughput}


def ar_forward(model, batch) -> tuple[torch.Tensor, Any]:
    """The causal-LM baseline on the clean windows: next-token loss inside each document."""
    n = batch.labels.shape[-1]
    tokens = batch.labels
    position_ids = batch.position_ids[:, n:]
    doc_ids = batch.layout[:, 0]
    labels = torch.roll(tokens, shifts=-1, dims=-1)
    loss_mask = batch.eligible.clone()
    loss_mask[:, :-1] &= (doc_ids[:, 1:] == doc_ids[:, :-1]) & batch.eligible[:, 1:]
    loss_mask[:, -1] = False
    output = model(tokens, position_ids, None, labels=labels)
    return output, partial(ar_loss, loss_mask=loss_mask)


def ar_loss(output: torch.Tensor, loss_mask: torch.Tensor):
    mask = loss_mask.float()
    loss_sum = (output.float() * mask).sum()
    count = mask.sum()
    return loss_sum, count.to(torch.int), {"lm loss": torch.stack([loss_sum.detach(), count])}
