"""Every private or version-fragile torch / megatron-core API the package uses, in one place.

Each wrapper names what it relies on and checks, when first used, that the installed version is one
this package was written against, so an upgrade fails early with a message that names the supported
versions instead of failing late (or quietly) deep inside a training step.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import logging
import os
import re
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

SUPPORTED_TORCH = "2.11"  # torch releases whose private APIs below were checked (major.minor)
SUPPORTED_MEGATRON_CORE = "0.19"
# Set to 1 to run with other releases anyway (each use still checks that the API itself is there).
ALLOW_UNTESTED = "MEGATRON_SDAR_ALLOW_UNTESTED_VERSIONS"


class UnsupportedVersionError(RuntimeError):
    """A private API this package relies on is missing or changed in the installed version."""


def _release(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


@functools.cache
def check_torch(feature: str) -> None:
    """Refuse a torch release other than :data:`SUPPORTED_TORCH` for ``feature`` (once per feature)."""
    if _release(torch.__version__) != SUPPORTED_TORCH and os.environ.get(ALLOW_UNTESTED) != "1":
        raise UnsupportedVersionError(
            f"{feature} uses a private torch API checked against torch {SUPPORTED_TORCH}.x, but torch "
            f"{torch.__version__} is installed; install torch=={SUPPORTED_TORCH}.* (setup.py pins it) or "
            f"set {ALLOW_UNTESTED}=1 to try anyway"
        )


@functools.cache
def check_megatron_core(feature: str) -> None:
    """Refuse a megatron-core release other than :data:`SUPPORTED_MEGATRON_CORE` for ``feature``."""
    from importlib.metadata import version

    installed = version("megatron-core")
    if _release(installed) != SUPPORTED_MEGATRON_CORE and os.environ.get(ALLOW_UNTESTED) != "1":
        raise UnsupportedVersionError(
            f"{feature} relies on megatron-core {SUPPORTED_MEGATRON_CORE}.x internals, but megatron-core "
            f"{installed} is installed; install megatron-core=={SUPPORTED_MEGATRON_CORE}.2 or set "
            f"{ALLOW_UNTESTED}=1 to try anyway"
        )


def tensor_version(tensor: torch.Tensor) -> int:
    """The tensor's in-place modification counter (``Tensor._version``, shared by views and detached
    aliases): what makes a cache keyed on a tensor's memory notice an in-place change."""
    return tensor._version


def _unsupported(feature: str, what: str, supported: str) -> UnsupportedVersionError:
    return UnsupportedVersionError(
        f"{feature}: {what} in the installed version; this package was checked against {supported}"
    )


# --- torch: flash attention's variable-length kernel -------------------------------------------------

_FLASH_FORWARD_ARGS = (
    "query", "key", "value", "cum_seq_q", "cum_seq_k", "max_q", "max_k", "dropout_p", "is_causal",
    "return_debug_mask", "scale",
)  # fmt: skip
_FLASH_BACKWARD_ARGS = (
    "grad_out", "query", "key", "value", "out", "logsumexp", "cum_seq_q", "cum_seq_k", "max_q", "max_k",
    "dropout_p", "is_causal", "rng_state", "unused", "scale",
)  # fmt: skip


@functools.cache
def _aten_op(name: str, arguments: tuple[str, ...]):
    """``torch.ops.aten.<name>`` after checking the torch release and that its schema still names
    ``arguments`` (they are passed by keyword, so a renamed or removed argument fails here, clearly)."""
    feature = f"flash attention's variable-length kernel (torch.ops.aten.{name})"
    check_torch(feature)
    op = getattr(torch.ops.aten, name, None)
    names = set() if op is None else {a.name for a in op.default._schema.arguments}
    missing = [a for a in arguments if a not in names]
    if missing:
        what = "the op is missing" if op is None else f"its schema lacks the arguments {missing}"
        raise _unsupported(feature, what, f"torch {SUPPORTED_TORCH}.x")
    return op


def flash_attention_varlen_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal variable-length flash attention (``torch.ops.aten._flash_attention_forward``, private).

    ``q [Nq, h, d]``, ``k``/``v [Nk, hk, d]`` packed segments delimited by the int32 offsets
    ``cu_q``/``cu_k``; the causal diagonal is aligned bottom-right in each segment; no dropout.
    Returns the output ``[Nq, h, d]`` and the log-sum-exp ``[Nq, h]`` in fp32 with ``-inf`` for a
    row without keys (the kernel itself reports ``[h, Nq]`` and ``+inf`` there).
    """
    op = _aten_op("_flash_attention_forward", _FLASH_FORWARD_ARGS)
    out, lse, *_ = op(
        query=q, key=k, value=v, cum_seq_q=cu_q, cum_seq_k=cu_k, max_q=max_q, max_k=max_k,
        dropout_p=0.0, is_causal=True, return_debug_mask=False, scale=scale,
    )  # fmt: skip
    lse = lse.t()
    return out, torch.where(torch.isinf(lse), float("-inf"), lse)


def flash_attention_varlen_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of :func:`flash_attention_varlen_forward`
    (``torch.ops.aten._flash_attention_backward``, private), given its output and ``lse [Nq, h]``
    (any output/lse with the same meaning, e.g. merged ones, works: the kernel recomputes the scores).
    """
    op = _aten_op("_flash_attention_backward", _FLASH_BACKWARD_ARGS)
    rng_state = torch.zeros(2, dtype=torch.uint64, device=q.device)  # no dropout: never read
    unused = torch.empty(0, device=q.device)
    dq, dk, dv = op(
        grad_out=dout, query=q, key=k, value=v, out=out, logsumexp=lse.t().contiguous(),
        cum_seq_q=cu_q, cum_seq_k=cu_k, max_q=max_q, max_k=max_k, dropout_p=0.0, is_causal=True,
        rng_state=rng_state, unused=unused, scale=scale,
    )  # fmt: skip
    return dq, dk, dv


# --- torch: FlexAttention block masks ----------------------------------------------------------------


@functools.cache
def _flex_create_block_mask():
    feature = "FlexAttention block masks (create_block_mask's private _compile flag)"
    check_torch(feature)
    from torch.nn.attention.flex_attention import create_block_mask

    if "_compile" not in inspect.signature(create_block_mask).parameters:
        raise _unsupported(
            feature, "create_block_mask has no _compile argument", f"torch {SUPPORTED_TORCH}.x"
        )
    return create_block_mask


def create_block_mask(
    mask_mod: Callable,
    batch: int | None,
    q_len: int,
    kv_len: int,
    device: torch.device | str,
    block_size: int | tuple[int, int] | None = None,
    compile: bool = False,
):
    """FlexAttention's ``create_block_mask`` for all heads alike (``H=None``).

    ``compile=True`` sets its private ``_compile`` flag: the construction is compiled so the
    ``Q_LEN x KV_LEN`` boolean grid is never materialised. ``block_size=None`` keeps FlexAttention's
    default ``BLOCK_SIZE``.
    """
    sizes = {} if block_size is None else {"BLOCK_SIZE": block_size}
    return _flex_create_block_mask()(
        mask_mod, B=batch, H=None, Q_LEN=q_len, KV_LEN=kv_len, device=device, _compile=compile, **sizes
    )


# --- torch: distributed checkpoint planning ----------------------------------------------------------


def read_items_for_chunks(fqn: str, stored: Any, chunks: list) -> list:
    """DCP ``ReadItem``s that load the regions ``chunks`` (``ChunkStorageMetadata``) of the stored
    tensor ``fqn`` (its ``TensorStorageMetadata``), whatever chunks it was saved in
    (``torch.distributed.checkpoint.planner_helpers.create_read_items_for_chunk_list``, private)."""
    feature = "reading checkpoint regions (torch.distributed.checkpoint.planner_helpers)"
    check_torch(feature)
    try:
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
    except ImportError as err:
        raise _unsupported(
            feature, "create_read_items_for_chunk_list is missing", f"torch {SUPPORTED_TORCH}.x"
        ) from err
    return create_read_items_for_chunk_list(fqn, stored, list(chunks))


# --- megatron-core: GPTDataset internals, dataset helpers, argument parser ---------------------------

_GPT_WINDOW_HELPERS = ("_query_document_sample_shuffle_indices", "_pad_token_id")


def gpt_dataset_window(dataset: Any, idx: int) -> tuple[np.ndarray, int]:
    """Window ``idx`` of a megatron-core ``GPTDataset``: its token ids as Megatron assembles them
    (documents spliced across the window, short final windows padded) and the padding token id.

    Uses ``GPTDataset._query_document_sample_shuffle_indices`` and ``GPTDataset._pad_token_id``
    (private): the public ``__getitem__`` drops the document structure and rewrites the padding.
    """
    feature = "SDAR windows of Megatron's GPT dataset (GPTDataset._query_document_sample_shuffle_indices)"
    check_megatron_core(feature)
    missing = [name for name in _GPT_WINDOW_HELPERS if not hasattr(dataset, name)]
    if missing:
        raise _unsupported(
            feature,
            f"{type(dataset).__name__} has no {missing}",
            f"megatron-core {SUPPORTED_MEGATRON_CORE}.x",
        )
    result = dataset._query_document_sample_shuffle_indices(idx)
    if not isinstance(result, tuple) or len(result) != 3:
        raise _unsupported(
            feature,
            "_query_document_sample_shuffle_indices no longer returns (tokens, document ids, lengths)",
            f"megatron-core {SUPPORTED_MEGATRON_CORE}.x",
        )
    return np.asarray(result[0], dtype=np.int64), int(dataset._pad_token_id)


def _check_shipped_dataset_helpers() -> None:
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError as err:
        raise RuntimeError(
            "megatron-core's compiled dataset helpers (helpers_cpp) are missing; reinstall "
            f"megatron-core=={SUPPORTED_MEGATRON_CORE}.2 from its binary wheel"
        ) from err


def use_shipped_dataset_helpers() -> None:
    """megatron-core's wheel ships the compiled dataset helpers but not their sources; Megatron's
    initialisation would try to rebuild them with ``make`` and exit. Check they import instead
    (replaces ``megatron.core.datasets.utils.compile_helpers``, which the initialisation looks up
    when it runs)."""
    feature = "using megatron-core's shipped dataset helpers (megatron.core.datasets.utils.compile_helpers)"
    check_megatron_core(feature)
    import megatron.core.datasets.utils as dataset_utils

    if not callable(getattr(dataset_utils, "compile_helpers", None)):
        raise _unsupported(
            feature, "megatron.core.datasets.utils.compile_helpers is missing",
            f"megatron-core {SUPPORTED_MEGATRON_CORE}.x",
        )  # fmt: skip
    dataset_utils.compile_helpers = _check_shipped_dataset_helpers


def escape_percent_in_help(parser: argparse.ArgumentParser) -> None:
    """Escape stray ``%`` in the help texts already added to ``parser`` (Megatron's own), which
    otherwise make ``--help`` crash in megatron-core 0.19.2: argparse formats every help text with
    ``%``. Walks argparse's private ``parser._actions`` (argparse has no public list of actions)."""
    check_megatron_core("escaping % in Megatron's --help texts (argparse's parser._actions)")
    for action in parser._actions:
        if action.help:
            try:
                action.help % {}
            except (TypeError, ValueError, KeyError):
                action.help = action.help.replace("%", "%%")


# --- warnings ----------------------------------------------------------------------------------------

# What megatron-core 0.19.2 and torch 2.11 warn about on every run that nobody using this package can
# act on, as (message regex, category, module regex) the way ``warnings.filterwarnings`` takes them:
# each is named, no category is ignored wholesale. pyproject.toml's pytest ``filterwarnings`` ignores
# exactly these (tests/test_compat.py checks that the two lists agree).
KNOWN_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # megatron-core without Transformer Engine / Apex, which this package does not use
    ("Transformer Engine and Apex are not installed", UserWarning, "megatron[.]"),
    ("Apex is not installed", UserWarning, "megatron[.]"),
    ("Only transformer-engine>=1.7.0 supports MoE experts", UserWarning, "megatron[.]"),
    # megatron-core logs through the standard logging module instead of absl: fine
    ("absl.logging is not installed", UserWarning, "megatron[.]"),
    # megatron-core deprecations that megatron-core triggers itself:
    # its own default cuda_graph_modules="full" (CUDA graphs are not used here)
    ("full scope is deprecated", UserWarning, "megatron[.]core[.]transformer[.]transformer_config"),
    # TransformerLayer builds its MLP without ffn_hidden_size
    ("MLP requires ffn_hidden_size", DeprecationWarning, "megatron[.]core[.]transformer[.]mlp"),
    # its linear layers' autograd function is called without tp_group
    (
        "Warning. tp_group is None, using default tp group",
        DeprecationWarning,
        "megatron[.]core[.]tensor_parallel",
    ),
    # megatron.core.inference.contexts re-exports, imported by megatron.training
    (
        "The following imports from `dynamic_context.py` will be removed",
        DeprecationWarning,
        "megatron[.]core[.]inference",
    ),
    # its argument parser passes type= to BooleanOptionalAction (--rl-persist-cuda-graphs; Python 3.12)
    ("'type' is deprecated as of Python 3.12", DeprecationWarning, "argparse"),
    # its torch_dist loader calls torch.distributed.checkpoint.load(state_dict, reader) positionally
    ("The argument order of load has been changed", UserWarning, "torch[.]distributed[.]checkpoint"),
    # torch 2.11 DCP warns on a single-process save/load even when no_dist=True is passed (converters)
    (
        "torch.distributed is disabled, unavailable or uninitialized",
        UserWarning,
        "torch[.]distributed[.]checkpoint",
    ),
    # torch 2.11 DCP's own planners probe every value for its deprecated ShardedTensor
    (
        "Please use DTensor instead and we are deprecating ShardedTensor",
        FutureWarning,
        "torch[.]distributed",
    ),
    # torch.utils.mkldnn (imported by torch itself) still defines TorchScript modules
    ("`torch.jit.script_method` is deprecated", DeprecationWarning, "torch[.]jit"),
)


# What they log (through ``logging``, not ``warnings``) on every run, as (logger, message regex).
KNOWN_LOG_RECORDS: tuple[tuple[str, str], ...] = (
    # megatron-core 0.19 marks GPTModel deprecated in favour of HybridModel each time one is built;
    # the SDAR and AR models are GPTModels (the Megatron model users convert to and from)
    ("megatron.core.models.gpt.gpt_model", "GPTModel IS DEPRECATED"),
    # its torch_dist loader calls its own deprecated load_common
    ("megatron.core.dist_checkpointing.strategies.common", "load_common is deprecated"),
    # torch looks for a CUDA toolkit when megatron-core imports its extension helpers; the tools
    # that run on the CPU need none
    ("torch.utils.cpp_extension", "No CUDA runtime is found"),
)


class KnownRecordFilter(logging.Filter):
    """Drops a logger's records whose message matches one of the given patterns."""

    def __init__(self, patterns: list[str]) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


def ignore_known_warnings() -> None:
    """Ignore :data:`KNOWN_WARNINGS` and :data:`KNOWN_LOG_RECORDS` (only those) in this process: for
    the command-line tools and ``pretrain_sdar.py``, whose users would otherwise see them on every
    run. Other warnings and other records of the same loggers still show."""
    for message, category, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    by_logger: dict[str, list[str]] = {}
    for name, pattern in KNOWN_LOG_RECORDS:
        by_logger.setdefault(name, []).append(pattern)
    for name, patterns in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, KnownRecordFilter) for f in logger.filters):
            logger.addFilter(KnownRecordFilter(patterns))
