"""FlexAttention for the SDAR mask: the compiled kernel, its block mask and measured tile options."""

from __future__ import annotations

import functools

import torch

from megatron_sdar import compat
from megatron_sdar.masks import CleanAttention, sdar_mask_mod


@functools.cache
def compiled_flex_attention():
    """The compiled FlexAttention kernel (compiled once per process)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


# FlexAttention backward tiles for Hopper at head dim 128, chosen by ``benchmarks/attention.py --sweep``
# on an H100 (L=4096, B=4, 16/8 heads, bf16): forward+backward 2.25 ms with the defaults, 2.00 ms with
# these. Other GPUs and head sizes keep FlexAttention's own defaults.
SM90_HEAD_DIM_128_OPTIONS = {
    "bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 64,
    "bwd_num_warps": 8, "bwd_num_stages": 2,
}  # fmt: skip


def default_kernel_options(query: torch.Tensor) -> dict | None:
    """The measured kernel options for this GPU and head size, or ``None`` (FlexAttention's own)."""
    if (
        query.is_cuda
        and query.shape[-1] == 128
        and query.dtype in (torch.bfloat16, torch.float16)
        and torch.cuda.get_device_capability(query.device) == (9, 0)
    ):
        return dict(SM90_HEAD_DIM_128_OPTIONS)
    return None


def build_block_mask(
    layout: torch.Tensor,
    clean_attention: CleanAttention | str,
    block: int = 128,
    compile: bool = False,
    query_index: torch.Tensor | None = None,
    key_index: torch.Tensor | None = None,
):
    """A FlexAttention ``BlockMask`` for the layout, built from the mask function.

    With ``compile=True`` (used on CUDA) the construction is compiled so the ``2L x 2L`` boolean
    grid is never materialised; uncompiled construction evaluates the grid in pieces.
    ``query_index`` and ``key_index`` (a context-parallel rank's,
    :class:`~megatron_sdar.context_parallel.CPPlan`): the queries and keys are those positions of
    the ``2L`` sequence, in that order; both or neither.
    """
    batch, _, seq_len = layout.shape
    mask_mod = sdar_mask_mod(layout, clean_attention)
    queries = keys = 2 * seq_len
    if (query_index is None) != (key_index is None):
        raise ValueError("query_index and key_index go together")
    if query_index is not None:
        whole = mask_mod

        def mask_mod(b, h, q_idx, kv_idx):
            return whole(b, h, query_index[q_idx], key_index[kv_idx])

        queries, keys = query_index.numel(), key_index.numel()
    return compat.create_block_mask(
        mask_mod,
        batch,
        queries,
        keys,
        layout.device,
        block_size=block,
        compile=compile,
    )
