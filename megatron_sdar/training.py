"""The pieces ``pretrain_sdar.py`` hands to ``megatron.training.pretrain``.

* :func:`add_sdar_args` / :func:`validate_sdar_args`: the ``--sdar-*`` argument group;
* :func:`model_provider`: the SDAR model (or, for ``--sdar-objective ar``, the same architecture as a
  plain causal LM, the in-framework baseline);
* :func:`train_valid_test_datasets_provider`: CPT windows from Megatron's ``GPTDataset`` (blends,
  splits and ``--data-path`` weights as in Megatron) or packed SFT windows;
* :func:`forward_step` and the loss functions.

Noise is drawn inside the dataset, from a generator seeded by ``(--seed, split, sample index)``.
Every pipeline stage and tensor-parallel rank that sees a sample therefore draws the same noise, and
a resumed run draws exactly what an uninterrupted run would have. Every rank builds the datasets and
reads its own copy of each micro-batch (no broadcast; the TP ranks check once that they agree).
"""

from __future__ import annotations

import argparse
import json
import os
import weakref
from functools import partial
from typing import Any

import numpy as np
import torch

from megatron_sdar.attention import ATTENTION_BACKENDS
from megatron_sdar.batch import build_sdar_batch
from megatron_sdar.config import LossNormalizer, PositionIds, SDARConfig
from megatron_sdar.loss import sdar_loss
from megatron_sdar.masks import BlockCounting, CleanAttention, document_ids_from_eod
from megatron_sdar.noise import NoiseUnit
from megatron_sdar.throughput import METER, REPORT_KEY

OBJECTIVES = ("sdar", "ar")
STAGES = ("cpt", "sft")
OUTPUT_POSITIONS = ("masked", "noised")
SPLIT_SEED_OFFSETS = {"train": 0, "valid": 1, "test": 2}


def add_sdar_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``--sdar-*`` flags (Megatron's extra-args provider)."""
    g = parser.add_argument_group("SDAR", "block-diffusion objective")
    g.add_argument(
        "--sdar-objective",
        choices=OBJECTIVES,
        default="sdar",
        help="sdar: block diffusion over [x_t; x_0]; ar: the same model as a causal LM",
    )
    g.add_argument(
        "--sdar-stage",
        choices=STAGES,
        default="cpt",
        help="cpt: GPTDataset windows, every real token eligible; sft: packed chat windows "
        "from tools/preprocess_sft.py, response tokens eligible",
    )
    g.add_argument("--sdar-block-size", type=int, default=4, help="block size B; must divide --seq-length")
    g.add_argument(
        "--sdar-mask-token-id",
        type=int,
        default=None,
        help="id of the mask token (Qwen3: 151669); must be inside the vocabulary and "
        "never occur in the data",
    )
    g.add_argument("--sdar-noise-eps", type=float, default=1e-3, help="p = (1 - eps) t + eps")
    g.add_argument(
        "--sdar-noise-unit",
        choices=[u.value for u in NoiseUnit],
        default="document",
        help="draw t once per document (default) or once per block",
    )
    g.add_argument("--sdar-loss-normalizer", choices=[n.value for n in LossNormalizer], default="eligible")
    g.add_argument(
        "--sdar-clean-attention", choices=[c.value for c in CleanAttention], default="block_causal"
    )
    g.add_argument("--sdar-block-counting", choices=[c.value for c in BlockCounting], default="document")
    g.add_argument(
        "--sdar-position-ids",
        choices=[p.value for p in PositionIds],
        default=None,
        help="continuous (CPT default) or restart per document (SFT default)",
    )
    g.add_argument(
        "--sdar-attention-backend",
        choices=ATTENTION_BACKENDS,
        default="auto",
        help="auto: flex on CUDA, sdpa on CPU; split: variable-length flash attention plus a local "
        "band (CUDA, bf16/fp16); see docs/performance.md",
    )
    g.add_argument(
        "--sdar-flex-kernel-options",
        type=json_object,
        default=None,
        help="FlexAttention kernel options as JSON (default: tuned tiles on Hopper at head dim 128, "
        "FlexAttention's own elsewhere; '{}' for FlexAttention's own everywhere); "
        "benchmarks/attention.py --sweep measures candidates",
    )
    g.add_argument(
        "--sdar-output-positions",
        choices=OUTPUT_POSITIONS,
        default="masked",
        help="where the output layer and cross-entropy run: masked (only the masked noised tokens, "
        "about half; the index is built on the host) or noised (the whole noised half); same loss "
        "and gradients",
    )
    g.add_argument(
        "--sdar-sft-pad-token-id",
        type=int,
        default=None,
        help="token that pads SFT windows (default: the tokenizer's end-of-document token)",
    )
    return parser  # fmt: skip


def json_object(text: str) -> dict:
    """argparse type: a JSON object (an error that says what is wrong otherwise)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"BLOCK_M\": 64}}', got {text!r}")
    return value


def sdar_config_from_args(args: argparse.Namespace) -> SDARConfig:
    positions = args.sdar_position_ids or ("document" if args.sdar_stage == "sft" else "continuous")
    return SDARConfig(
        block_size=args.sdar_block_size,
        mask_token_id=-1 if args.sdar_mask_token_id is None else args.sdar_mask_token_id,
        noise_eps=args.sdar_noise_eps,
        noise_unit=args.sdar_noise_unit,
        loss_normalizer=args.sdar_loss_normalizer,
        clean_attention=args.sdar_clean_attention,
        block_counting=args.sdar_block_counting,
        position_ids=positions,
        attention_backend=args.sdar_attention_backend,
        flex_kernel_options=getattr(args, "sdar_flex_kernel_options", None),
    )


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _resumable_checkpoint(args: argparse.Namespace) -> bool:
    """Whether this run will restore optimizer state from ``--load``."""
    load = getattr(args, "load", None)
    if not load or getattr(args, "finetune", False) or getattr(args, "no_load_optim", False):
        return False
    return os.path.exists(os.path.join(load, "latest_checkpointed_iteration.txt"))


def validate_sdar_args(args: argparse.Namespace, vocab_size: int | None = None, special_tokens=None) -> None:
    """Fail early, saying what to change, on settings SDAR training cannot run with."""
    problems = []
    if args.context_parallel_size > 1:
        problems.append(
            "context parallelism is not implemented yet (design: docs/context_parallel.md): "
            "use --context-parallel-size 1"
        )
    tp = getattr(args, "tensor_model_parallel_size", 1)
    if getattr(args, "sequence_parallel", False) and args.seq_length % tp:
        problems.append(f"--sequence-parallel splits the window over TP={tp}, but --seq-length "
                        f"{args.seq_length} is not a multiple of it")  # fmt: skip
    if getattr(args, "rotary_interleaved", False):
        problems.append("SDAR models use non-interleaved RoPE (Qwen3, Llama): drop --rotary-interleaved")
    if args.position_embedding_type != "rope":
        problems.append(f"SDAR models use RoPE: pass --position-embedding-type rope "
                        f"(got {args.position_embedding_type})")  # fmt: skip
    if (
        args.transformer_impl == "local"
        and not getattr(args, "no_persist_layer_norm", True)
        and not _importable("apex")
    ):
        problems.append("--transformer-impl local without Apex uses torch norms, which cannot persist: "
                        "pass --no-persist-layer-norm")  # fmt: skip
    if (
        args.transformer_impl == "local"
        and getattr(args, "gradient_accumulation_fusion", False)
        and not _importable("fused_weight_gradient_mlp_cuda")
    ):
        problems.append("--transformer-impl local without Apex's CUDA extensions cannot fuse gradient "
                        "accumulation: pass --no-gradient-accumulation-fusion")  # fmt: skip
    have_te = _importable("transformer_engine")
    if getattr(args, "apply_rope_fusion", False) and not have_te:
        problems.append("fused RoPE needs Transformer Engine, which is not installed: pass --no-rope-fusion")
    if (
        getattr(args, "use_distributed_optimizer", False)
        and not (have_te or _importable("apex"))
        and _resumable_checkpoint(args)
    ):
        problems.append("megatron-core 0.19.2's distributed optimizer cannot restore its state with "
                        f"torch's Adam (no Apex or Transformer Engine), and {args.load} holds a checkpoint: "
                        "run where TE or Apex is installed (NGC containers), drop "
                        "--use-distributed-optimizer, or pass --no-load-optim")  # fmt: skip
    if args.transformer_impl == "transformer_engine" and not have_te:
        problems.append("--transformer-impl transformer_engine was asked for but Transformer Engine is not "
                        "installed: install it (NGC PyTorch containers have it) or pass "
                        "--transformer-impl local")  # fmt: skip
    if args.sdar_objective == "sdar":
        if not args.calculate_per_token_loss:
            problems.append(
                "the SDAR loss is normalised by a global token count: pass --calculate-per-token-loss"
            )
        if args.sdar_mask_token_id is None:
            problems.append("--sdar-mask-token-id is required (Qwen3: 151669 '<|MASK|>')")
        if args.attention_dropout != 0.0:
            problems.append("SDAR attention has no dropout: pass --attention-dropout 0")
        if args.sdar_attention_backend == "split":
            if not (getattr(args, "bf16", False) or getattr(args, "fp16", False)):
                problems.append("--sdar-attention-backend split runs flash attention, which needs "
                                "--bf16 or --fp16 (or use --sdar-attention-backend flex)")  # fmt: skip
            head_dim = getattr(args, "kv_channels", None) or args.hidden_size // args.num_attention_heads
            if head_dim > 256 or head_dim % 8:
                problems.append(f"--sdar-attention-backend split runs flash attention, which needs a head "
                                f"size that is a multiple of 8 up to 256 (got {head_dim}); use "
                                "--sdar-attention-backend flex")  # fmt: skip
        try:
            known_vocab = vocab_size if args.sdar_mask_token_id is not None else None
            sdar_config_from_args(args).validate(args.seq_length, known_vocab, special_tokens)
        except ValueError as err:
            problems.append(str(err))
    if args.sdar_stage == "sft" and getattr(args, "mock_data", False):
        problems.append("--mock-data only provides CPT windows; use --sdar-stage cpt")
    if problems:
        raise ValueError("invalid SDAR settings:\n  - " + "\n  - ".join(problems))


class SDARSampleDataset(torch.utils.data.Dataset):
    """Wraps a dataset of clean windows (``tokens``, ``doc_ids``, ``eligible``) and returns ready
    SDAR samples, noised with a generator seeded by ``(seed, split, index)``."""

    def __init__(self, base: Any, config: SDARConfig, seed: int, split: str) -> None:
        self.base = base
        self.config = config
        self.seed = seed
        self.split_offset = SPLIT_SEED_OFFSETS[split]

    def __len__(self) -> int:
        return len(self.base)

    def noise_seed(self, idx: int) -> int:
        return (self.seed * 1_000_003 + self.split_offset * 998_244_353 + idx * 7_919 + 17) % (2**62)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        sample = self.base[idx]
        gen = torch.Generator().manual_seed(self.noise_seed(idx))
        batch = build_sdar_batch(
            sample["tokens"][None], sample["doc_ids"][None], sample["eligible"][None], self.config, gen
        )
        return {
            "input_ids": batch.input_ids[0],
            "position_ids": batch.position_ids[0],
            "layout": batch.layout[0],
            "labels": batch.labels[0],
            "eligible": batch.eligible[0],
            "masked": batch.masked[0],
            "mask_prob": batch.mask_prob[0],
            "t": batch.t[0],
        }


def clean_window(dataset: Any, idx: int) -> dict[str, torch.Tensor]:
    """A GPT dataset's window ``idx`` as ``tokens``, ``doc_ids``, ``eligible``.

    Documents are delimited by the end-of-document token; padding Megatron adds to a short final
    window is not eligible and forms a document of its own.
    """
    text, _, _ = dataset._query_document_sample_shuffle_indices(idx)
    eod = dataset.config.tokenizer.eod
    tokens = torch.from_numpy(np.asarray(text, dtype=np.int64))
    pad = tokens == dataset._pad_token_id
    tokens = torch.where(pad, torch.full_like(tokens, eod), tokens)
    doc_ids = document_ids_from_eod(tokens[None], eod)[0].to(torch.int64)
    doc_ids = torch.where(pad, doc_ids.max() + 1, doc_ids)
    return {"tokens": tokens, "doc_ids": doc_ids, "eligible": ~pad}


def _sdar_gpt_dataset_classes() -> tuple[type, type]:
    """``GPTDataset``/``MockGPTDataset`` returning clean SDAR windows (built lazily: Megatron import)."""
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset

    class SDARGPTDataset(GPTDataset):
        """Megatron's GPT dataset (blends, splits, caching) yielding clean SDAR windows."""

        def __getitem__(self, idx):
            return clean_window(self, 0 if idx is None else idx)

    class SDARMockGPTDataset(MockGPTDataset):
        """Megatron's synthetic GPT dataset yielding clean SDAR windows."""

        def __getitem__(self, idx):
            return clean_window(self, 0 if idx is None else idx)

    return SDARGPTDataset, SDARMockGPTDataset


class EpochDataset(torch.utils.data.Dataset):
    """``num_samples`` samples drawn from ``base`` epoch by epoch, each epoch in a fresh seeded order.

    Sample ``i`` is a pure function of ``(seed, i)``, so Megatron's sampler resumes it exactly.
    """

    def __init__(self, base: Any, num_samples: int, seed: int) -> None:
        if len(base) == 0:
            raise ValueError("the dataset is empty")
        self.base = base
        self.num_samples = num_samples
        self.seed = seed
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> Any:
        epoch, pos = divmod(idx, len(self.base))
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = (epoch, rng.permutation(len(self.base)))
        return self.base[int(self._perm[1][pos])]


def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None,
                   config: Any = None, pg_collection: Any = None) -> torch.nn.Module:  # fmt: skip
    """Build this stage's model from Megatron's parsed arguments."""
    from megatron.core.models.gpt import GPTModel
    from megatron.training import get_args
    from megatron.training.arguments import core_transformer_config_from_args

    from megatron_sdar.model import ARModel, SDARModel, ar_layer_spec, sdar_layer_spec

    args = get_args()
    transformer_config = config if config is not None else core_transformer_config_from_args(args)
    use_te = args.transformer_impl == "transformer_engine"
    common = dict(
        config=transformer_config,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        rotary_base=args.rotary_base,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
    )
    if args.sdar_objective == "ar":
        spec = ar_layer_spec(transformer_config, use_te, vp_stage)
        model_class = GPTModel if use_te else ARModel  # TE fuses RoPE itself
        return model_class(transformer_layer_spec=spec, position_embedding_type="rope", **common)
    sdar = sdar_config_from_args(args)
    return SDARModel(
        transformer_layer_spec=sdar_layer_spec(transformer_config, sdar, use_te, vp_stage),
        sdar_config=sdar,
        **common,
    )


SDAR_KEYS = ("input_ids", "position_ids", "layout", "labels", "eligible", "masked", "mask_prob", "t")


def output_on_masked(args: argparse.Namespace) -> bool:
    """Whether ``--sdar-output-positions`` runs the output layer on the masked positions only."""
    return getattr(args, "sdar_output_positions", "masked") == "masked"


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
        from megatron_sdar.attention import MASK_CACHE

        MASK_CACHE.set_host_copy(out["layout"], host["layout"])
    if loss_index:
        from megatron_sdar.model import masked_loss_index

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


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """CPT: Megatron GPT datasets (blends and splits as usual); SFT: packed windows."""
    from megatron.training import get_args, get_tokenizer, print_rank_0

    args = get_args()
    sdar = sdar_config_from_args(args)
    tokenizer = get_tokenizer()
    if args.sdar_stage == "sft":
        from megatron_sdar.data import SFTWindowDataset

        if not args.data_path or len(args.data_path) != 1:
            raise ValueError(
                "--sdar-stage sft takes one --data-path prefix written by tools/preprocess_sft.py"
            )
        pad_id = args.sdar_sft_pad_token_id if args.sdar_sft_pad_token_id is not None else tokenizer.eod
        windows = SFTWindowDataset(args.data_path[0], args.seq_length, pad_id)
        train = EpochDataset(windows, max(train_val_test_num_samples[0], 1), args.seed)
        datasets = [train, None, None]
        if args.valid_data_path:
            valid = SFTWindowDataset(args.valid_data_path[0], args.seq_length, pad_id)
            datasets[1] = EpochDataset(valid, max(train_val_test_num_samples[1], 1), args.seed + 1)
    else:
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
        from megatron.training.utils import get_blend_and_blend_per_split

        blend, blend_per_split = get_blend_and_blend_per_split(args)
        gpt_config = GPTDatasetConfig(
            random_seed=args.seed,
            sequence_length=args.seq_length,
            blend=blend,
            blend_per_split=blend_per_split,
            split=args.split,
            path_to_cache=args.data_cache_path,
            tokenizer=tokenizer,
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=False,
            add_extra_token_to_sequence=False,
        )
        real, mock = _sdar_gpt_dataset_classes()
        print_rank_0("> building SDAR CPT datasets ...")
        # Every rank builds (the builder lets rank 0 write the index caches first) and reads its own
        # copy of each micro-batch: see get_sdar_batch.
        datasets = BlendedMegatronDatasetBuilder(
            mock if args.mock_data else real, train_val_test_num_samples, lambda: True, gpt_config
        ).build()
    return tuple(
        None if ds is None else SDARSampleDataset(ds, sdar, args.seed, split)
        for ds, split in zip(datasets, ("train", "valid", "test"))
    )


# Megatron calls the provider, and builds data loaders, on every rank.
train_valid_test_datasets_provider.is_distributed = True
