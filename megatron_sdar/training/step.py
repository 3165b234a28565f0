"""The training step Megatron runs per micro-batch, and the state it keeps between micro-batches.

:class:`SDARForwardStep` is Megatron's ``forward_step_func``. It owns what it carries from one
micro-batch to the next: an :class:`SDARBatchReader` (the host-to-device copy, which hands back the
previous device tensors when a micro-batch repeats the packing, so the model's masks are reused, and
the once-per-iterator tensor-parallel agreement check) and the data-token throughput meter.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch

from megatron_sdar.attention.cache import tensor_key
from megatron_sdar.batch import BATCH_FIELDS, BatchField, SDARBatch, check_batch_shapes
from megatron_sdar.context_parallel import (
    block_size_problem,
    clean_positions,
    context_parallel_rank_and_size,
    slice_micro_batch,
)
from megatron_sdar.embedding_noise import noise_seed
from megatron_sdar.loss import next_token_targets, sdar_loss
from megatron_sdar.schedule import BLOCK_SIZE_FIELD, BLOCK_SIZE_KEY, block_size_report
from megatron_sdar.training.arguments import (
    ar_loss_weight,
    largest_block_size,
    mask_embedding_noise,
    output_on_masked,
)
from megatron_sdar.training.throughput import REPORT_KEY, ThroughputMeter


class IteratorsSeen:
    """Which data iterators were seen, remembered without relying on ``id`` (which a new object may
    reuse once the old one is gone): by weak reference, or kept alive where that is impossible."""

    def __init__(self) -> None:
        self._weak: weakref.WeakSet = weakref.WeakSet()
        self._plain: dict[int, Any] = {}  # iterators without weak references (e.g. a list iterator)

    def first_time(self, iterator: Any) -> bool:
        """Whether ``iterator`` is seen here for the first time (and remember it)."""
        try:
            if iterator in self._weak:
                return False
            self._weak.add(iterator)
        except TypeError:
            if id(iterator) in self._plain:
                return False
            self._plain[id(iterator)] = iterator
        return True


def batch_digest(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A few numbers that differ when two ranks hold different micro-batches: every field's sum and a
    position-weighted token sum (float64 holds these sums exactly at any realistic size)."""
    sums = [batch[f.name].to(torch.float64).sum() for f in BATCH_FIELDS]
    tokens = batch["input_ids"]
    weighted = (tokens * torch.arange(1, tokens.shape[-1] + 1, device=tokens.device)).sum().to(torch.float64)
    return torch.stack([*sums, weighted])


def check_tensor_parallel_agreement(
    batch: Mapping[str, torch.Tensor], device: torch.device | None = None
) -> None:
    """Every tensor- and context-parallel rank read the same micro-batch (one small all-reduce pair).

    Each rank reads its own copy of the data; samples and noise depend on ``(seed, split, index)``
    only, so a disagreement means a dataset that is not deterministic, which would train each
    tensor-parallel shard (or each context-parallel chunk) on different data. ``batch`` is the whole
    micro-batch (before a context-parallel rank keeps its part); the digest is reduced on ``device``.
    """
    from megatron.core import parallel_state

    if parallel_state.get_tensor_and_context_parallel_world_size() == 1:
        return
    digest = batch_digest(batch)
    if device is not None:
        digest = digest.to(device)
    low, high = digest.clone(), digest.clone()
    group = parallel_state.get_tensor_and_context_parallel_group()
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN, group=group)
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX, group=group)
    if not torch.equal(low, high):
        raise RuntimeError(
            "tensor- or context-parallel ranks read different micro-batches: the dataset must give the "
            "same sample for the same index on every rank (noise is seeded by --seed, split and index)"
        )


class SDARBatchReader:
    """Reads SDAR micro-batches from a data iterator onto a device.

    Every rank reads its own copy from its data loader (the dataset is built on every rank), so
    nothing is broadcast, and the index of masked positions is built on the host from the loader's
    (pinned) tensors and copied without a device synchronisation, at any tensor-parallel size. The
    fields masks and RoPE tables are derived from (``BatchField.reused``) come back as the previous
    micro-batch's device tensors when their contents repeat (compared on the host, no device
    synchronisation), so windows with the same packing share their masks instead of rebuilding
    them. The first micro-batch of each iterator is checked to agree across tensor-parallel ranks.
    """

    def __init__(self) -> None:
        self._last: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor, tuple]] = {}
        self._checked = IteratorsSeen()

    def _to_device(self, field: BatchField, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        if not field.reused:
            return host.to(device=device, dtype=field.dtype, non_blocking=True)
        last = self._last.get((field.name, device))
        if (
            last is not None
            and tensor_key(last[1]) == last[2]  # the device tensor is as it was copied
            and last[0].shape == host.shape
            and last[0].dtype == host.dtype
            and torch.equal(last[0], host)
        ):
            return last[1]
        tensor = host.to(device=device, dtype=field.dtype, non_blocking=True)
        self._last[(field.name, device)] = (host, tensor, tensor_key(tensor))
        return tensor

    def read(
        self,
        data_iterator: Any,
        device: torch.device,
        micro_batch_size: int,
        seq_length: int,
        loss_index: bool = False,
        ar_index: bool = False,
        ar_targets: bool = False,
        context_parallel: tuple[int, int] = (0, 1),
        block_size_bound: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """The next micro-batch on ``device``: every :class:`~megatron_sdar.batch.SDARBatch` field,
        ``layout_host`` (the loader's CPU copy of the layout, for what is planned on the host) and,
        with ``loss_index``, the masked positions for
        :meth:`~megatron_sdar.model.SDARModel.selected_output`. ``ar_targets`` (the joint AR loss):
        ``ar_labels`` and ``ar_valid``, the clean half's next-token targets and where there is one,
        and with ``ar_index``, as ``ar_loss_index``, those positions.

        ``context_parallel = (rank, size)``: the micro-batch is read whole, checked, its AR targets
        derived, and then only this rank's part is kept
        (:func:`~megatron_sdar.context_parallel.slice_micro_batch`): the per-position fields and
        targets at its positions, the position ids and layout whole. ``block_size_bound``, the
        largest block the model exchanges noised keys for under CP, is checked against the layout."""
        from megatron_sdar.model.sdar import masked_loss_index

        if data_iterator is None:
            raise RuntimeError("this rank has no data iterator; the SDAR datasets are built on every rank")
        host = next(data_iterator)
        check_batch_shapes(host, micro_batch_size, seq_length)
        if self._checked.first_time(data_iterator):
            check_tensor_parallel_agreement(host, device)
        ar = {}
        if ar_targets or ar_index:
            ar["ar_labels"], ar["ar_valid"] = next_token_targets(
                host["labels"], host["layout"], host["eligible"]
            )
        cp_rank, cp_size = context_parallel
        if cp_size > 1:
            problem = block_size_problem(host["layout"], block_size_bound or 1)
            if problem:
                raise ValueError(problem)
            host = slice_micro_batch(host, cp_size, cp_rank)
            positions = clean_positions(host["layout"].shape[-1], cp_size, cp_rank)
            ar = {name: value.index_select(-1, positions) for name, value in ar.items()}
        out = {f.name: self._to_device(f, host[f.name], device) for f in BATCH_FIELDS}
        if host["layout"].device.type == "cpu":
            out["layout_host"] = host["layout"]
        if loss_index:
            out["loss_index"] = _index_to(masked_loss_index(host["masked"].to(torch.bool)), device)
        if ar_index:
            out["ar_loss_index"] = _index_to(masked_loss_index(ar["ar_valid"]), device)
        for name, value in ar.items():
            out[name] = value.to(device, non_blocking=True)
        if BLOCK_SIZE_FIELD in host:  # under a block-size schedule: each sample's block size, on the host
            out[BLOCK_SIZE_FIELD] = host[BLOCK_SIZE_FIELD]
        return out


def _index_to(index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host index on ``device`` without a synchronisation (pinned first when going to CUDA)."""
    if device.type == "cuda" and index.device.type == "cpu":
        index = index.pin_memory()
    return index.to(device, non_blocking=True)


class SDARForwardStep:
    """Megatron's ``forward_step_func`` for both objectives (``pretrain_sdar.py`` makes one per run)."""

    def __init__(self) -> None:
        self.reader = SDARBatchReader()
        self.meter = ThroughputMeter()
        self._micro_batch = (-1, 0)  # (iteration, training forwards in it so far)

    def embedding_noise(self, args: Any, training: bool) -> tuple[float, int] | None:
        """``(std, seed)`` for the model's mask-embedding noise in this training forward, or ``None``.

        The seed depends on ``(--seed, iteration, micro-batch of the iteration, data-parallel rank)``
        only, so tensor-parallel ranks agree and a resumed run draws what the uninterrupted one did.
        """
        std, iterations = mask_embedding_noise(args)
        if not training or std <= 0:
            return None
        iteration = int(getattr(args, "curr_iteration", 0) or 0)
        last, count = self._micro_batch
        count = count + 1 if iteration == last else 0
        self._micro_batch = (iteration, count)
        if iteration >= iterations:
            return None
        from megatron.core import parallel_state

        initialized = parallel_state.model_parallel_is_initialized()
        rank = parallel_state.get_data_parallel_rank() if initialized else 0
        return std, noise_seed(int(getattr(args, "seed", 0)), iteration, count, rank)

    def __call__(self, data_iterator: Any, model: Any) -> tuple[torch.Tensor, Any]:
        from megatron.core import parallel_state
        from megatron.training import get_args, get_timers

        args = get_args()
        timers = get_timers()
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
        timers("batch-generator", log_level=2).start()
        selected = args.sdar_objective == "sdar" and output_on_masked(args)
        ar_weight = ar_loss_weight(args) if args.sdar_objective == "sdar" else 0.0
        cp_rank, cp_size = context_parallel_rank_and_size()
        data = self.reader.read(
            data_iterator, device, args.micro_batch_size, args.seq_length, loss_index=selected,
            ar_index=selected and ar_weight > 0, ar_targets=ar_weight > 0,
            context_parallel=(cp_rank, cp_size),
            block_size_bound=largest_block_size(args) if cp_size > 1 else None,
        )  # fmt: skip
        timers("batch-generator").stop()
        batch = SDARBatch.from_mapping(data)
        data_tokens = batch.labels.numel() * cp_size  # the whole window: its CP ranks count it once
        if args.sdar_objective == "sdar" and getattr(args, "sdar_complementary_masks", False):
            data_tokens //= 2  # every window is in the micro-batch twice
        throughput = self.meter.report(
            data_tokens, model.training, device, parallel_state.get_data_parallel_world_size()
        )
        noise_report = None  # the mask-embedding noise's std in this step, when it is configured
        if args.sdar_objective == "ar":
            output, loss_fn = ar_forward(model, batch)
        else:
            extra = {}
            if ar_weight > 0:  # the joint AR loss: next-token targets for the clean half
                extra["ar_labels"] = data["ar_labels"]
                extra["ar_index"] = data.get("ar_loss_index")
            noise = self.embedding_noise(args, model.training)
            if noise is not None:
                extra["mask_embedding_noise"] = noise
            if model.training and mask_embedding_noise(args)[0] > 0:  # the log shows when it stops
                noise_report = torch.tensor([noise[0] if noise is not None else 0.0, 1.0], device=device)
            output = model(
                batch.input_ids, batch.position_ids, batch.layout, labels=batch.labels,
                loss_index=data.get("loss_index"), layout_host=data.get("layout_host"), **extra,
            )  # fmt: skip
            loss_fn = partial(
                sdar_loss, batch=batch, normalizer=args.sdar_loss_normalizer, ar_weight=ar_weight,
                ar_valid=data.get("ar_valid"), count_group=_context_parallel_group(cp_size),
            )  # fmt: skip
        reported = partial(_with_entry, loss_fn, REPORT_KEY, throughput)
        if BLOCK_SIZE_FIELD in data:
            block_sizes = block_size_report(data[BLOCK_SIZE_FIELD], device)
            reported = partial(_with_entry, reported, BLOCK_SIZE_KEY, block_sizes)
        if noise_report is not None:
            reported = partial(_with_entry, reported, NOISE_KEY, noise_report)
        return output, reported


def _context_parallel_group(cp_size: int) -> Any:
    """The group the joint loss sums its per-window counts over (``None`` without CP)."""
    if cp_size == 1:
        return None
    from megatron.core import parallel_state

    return parallel_state.get_context_parallel_group()


NOISE_KEY = "mask emb noise"  # the mask-embedding noise's std in this iteration (0 once it stopped)


def _with_entry(loss_fn, key: str, pair: torch.Tensor, output: torch.Tensor):
    """Add a ``[value, count]`` pair under ``key`` to the loss function's report (the data tokens/s,
    the samples' block sizes under a schedule, the mask-embedding noise)."""
    loss_sum, count, report = loss_fn(output)
    return loss_sum, count, {**report, key: pair}


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
