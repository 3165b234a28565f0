"""SDAR attention split into standard-kernel parts, merged by log-sum-exp.

Why: FlexAttention visits about half the tiles that causal attention over 2L visits, but runs each
tile about half as fast as flash attention, so SDAR attention cost as much as causal attention over
all 2L tokens. The SDAR mask splits exactly into two parts (``S`` = the longest block, ``s`` = the
query's document start, positions counted inside the L-long window):

* **main**, causal attention inside each document: a clean query at ``p`` sees the clean keys
  ``[s, p]``; a noised query at ``p`` sees the clean keys ``[s, p - S]`` (causal, shifted by ``S``,
  which never reaches the query's own block);
* **band**, everything else, all within ``S - 1`` positions of the query: the clean keys after
  ``p`` in its block (clean queries), the clean keys between ``p - S`` and the block start and the
  noised keys of the block (noised queries).

The main part is one call of flash attention's variable-length kernel with one segment per (row,
half, document). A noised segment gets a key segment ``S`` shorter than its query segment: the kernel
aligns the causal diagonal bottom-right, which is exactly the shift. The band runs through
FlexAttention on CUDA, where its mask touches only the tiles along the diagonals, or as plain torch
over tiles of ``S`` query positions against the ``3S`` positions around them (compiled on CUDA; the
only way on CPU; ``build_split_plan(band=...)`` chooses). See
``_SplitSDARAttention`` for how the backward pass makes both parts' gradients exact.

The plan (segments, key rows, band masks) is built once per layout and cached with the other masks,
from the data loader's host copy of the layout when the training loop recorded one
(``SDARMaskCache.set_host_copy``), otherwise by reading the layout back once. The layout may be the
data pipeline's ``[b, 2, L]`` or the ``[b, 3, L]`` that ``SDARModel`` gives its layers (RoPE positions
as a third row); the plan reads the document and block rows only.

On CPU the main part runs a dense reference of the same variable-length kernel (for tests); on CUDA
it needs fp16 or bf16 inputs and a head size flash attention supports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from megatron_sdar import compat
from megatron_sdar.compiled import compiled_on_cuda
from megatron_sdar.masks import LAYOUT_BLOCK, LAYOUT_DOC, CleanAttention, sdar_mask_mod, sdar_mask_rule


@dataclass(frozen=True)
class SplitPlan:
    """How one layout's SDAR mask splits into the main (variable-length causal) and band parts."""

    batch: int
    seq_len: int  # L
    span: int  # S: the longest block, the causal shift and the local tile size
    cu_q: torch.Tensor  # [segments + 1] int32: query segment offsets into the [b * 2L] rows
    cu_k: torch.Tensor  # [segments + 1] int32: key segment offsets into the gathered key rows
    cu_q_host: tuple[int, ...]
    cu_k_host: tuple[int, ...]
    max_q: int
    max_k: int
    key_rows: torch.Tensor  # [cu_k[-1]] int64: rows of the [b * 2L] keys forming the key segments
    local_mask: torch.Tensor  # [b, tiles, 2, S, 2, 3S] bool: (query half, offset) x (key half, window)
    band_block_mask: Any = None  # FlexAttention BlockMask of the band (CUDA), or None (torch tiles)

    @property
    def tiles(self) -> int:
        return self.local_mask.shape[1]


def _run_lengths(starts: torch.Tensor) -> torch.Tensor:
    """Lengths of the runs that begin where ``starts`` (flattened, first of each row true) is true."""
    begin = starts.flatten().nonzero().flatten()
    return torch.diff(begin, append=torch.tensor([starts.numel()]))


BAND_KERNELS = ("auto", "flex", "tiles")


def build_split_plan(
    layout: torch.Tensor,
    clean_attention: CleanAttention | str,
    band: str = "auto",
    host: torch.Tensor | None = None,
) -> SplitPlan:
    """The split of the SDAR mask for a ``[b, 2, L]`` layout.

    ``band``: how the band runs: ``flex`` (FlexAttention, CUDA), ``tiles`` (torch over tiles of
    ``S`` positions, compiled on CUDA) or ``auto`` (flex on CUDA, tiles on CPU). ``host``: a CPU
    copy of the layout's rows (the data loader's); without it the layout is read back once, which
    synchronises with the device.
    """
    if band not in BAND_KERNELS:
        raise ValueError(f"band kernel must be one of {BAND_KERNELS}, got {band!r}")
    if band == "flex" and not layout.is_cuda:
        raise ValueError("the FlexAttention band needs CUDA tensors; use band='tiles' on CPU")
    clean_attention = CleanAttention(clean_attention)
    batch, _, seq_len = layout.shape
    if host is None:
        host = layout.detach()[:, :2].to("cpu", torch.int64)
    elif host.device.type != "cpu" or host.shape[0] != batch or host.shape[-1] != seq_len:
        raise ValueError(f"host copy {list(host.shape)} does not match the layout {list(layout.shape)}")
    docs, blocks = host[:, LAYOUT_DOC].to(torch.int64), host[:, LAYOUT_BLOCK].to(torch.int64)
    new_doc = torch.ones(batch, seq_len, dtype=torch.bool)
    new_doc[:, 1:] = docs[:, 1:] != docs[:, :-1]
    for row in range(batch):
        if torch.unique(docs[row]).numel() != int(new_doc[row].sum()):
            raise ValueError(
                f"row {row} of the layout has a document id in more than one span; the split SDAR "
                "attention needs each document contiguous (use --sdar-attention-backend flex)"
            )
    same_doc_next = ~new_doc[:, 1:]
    if bool(((blocks[:, 1:] < blocks[:, :-1]) & same_doc_next).any()):
        raise ValueError(
            "block indices decrease inside a document; the split SDAR attention needs blocks in "
            "order (use --sdar-attention-backend flex)"
        )
    new_block = new_doc.clone()
    new_block[:, 1:] |= blocks[:, 1:] != blocks[:, :-1]
    span = int(_run_lengths(new_block).max())

    # Documents as (row, start, length), in row-major order.
    doc_begin = new_doc.flatten().nonzero().flatten()
    doc_len = _run_lengths(new_doc)
    row, start = doc_begin // seq_len, doc_begin % seq_len
    two_l = 2 * seq_len
    clean_rows = row * two_l + seq_len + start  # first clean key row of each document
    # Query segments tile the [b, 2L] rows in order: each row's noised documents, then its clean ones.
    q_start = torch.cat([row * two_l + start, clean_rows])
    q_len = torch.cat([doc_len, doc_len])
    k_src = torch.cat([clean_rows, clean_rows])
    k_len = torch.cat([(doc_len - span).clamp(min=0), doc_len])
    order = torch.argsort(q_start)
    q_len, k_src, k_len = q_len[order], k_src[order], k_len[order]
    cu_q = torch.cat([torch.zeros(1, dtype=torch.int64), q_len.cumsum(0)])
    cu_k = torch.cat([torch.zeros(1, dtype=torch.int64), k_len.cumsum(0)])
    total_k = int(cu_k[-1])
    key_rows = torch.repeat_interleave(k_src - cu_k[:-1], k_len) + torch.arange(total_k)

    device = layout.device
    return SplitPlan(
        batch=batch,
        seq_len=seq_len,
        span=span,
        cu_q=_to_device(cu_q.to(torch.int32), device),
        cu_k=_to_device(cu_k.to(torch.int32), device),
        cu_q_host=tuple(cu_q.tolist()),
        cu_k_host=tuple(cu_k.tolist()),
        max_q=int(q_len.max()),
        max_k=int(k_len.max()),
        key_rows=_to_device(key_rows, device),
        local_mask=_local_mask(layout, span, clean_attention),
        band_block_mask=(
            _band_block_mask(layout, clean_attention, span)
            if band == "flex" or (band == "auto" and layout.is_cuda)
            else None
        ),
    )


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy without waiting for the device (through pinned memory on CUDA)."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _band_block_mask(layout: torch.Tensor, clean_attention: CleanAttention, span: int):
    batch, _, seq_len = layout.shape
    return compat.create_block_mask(
        band_mask_mod(layout, clean_attention, span), batch, 2 * seq_len, 2 * seq_len, layout.device,
        compile=True,
    )  # fmt: skip


def _local_mask(layout: torch.Tensor, span: int, clean_attention: CleanAttention) -> torch.Tensor:
    """``[b, tiles, 2, S, 2, 3S]``: what the SDAR rule allows and the main part does not cover.

    Query tile ``t`` holds positions ``tS + i``; its key window holds positions ``tS - S + w``.
    """
    batch, _, seq_len = layout.shape
    tiles = -(-seq_len // span)
    dev = layout.device
    t = torch.arange(tiles, device=dev).view(tiles, 1, 1, 1, 1)
    x = torch.arange(2, device=dev).view(1, 2, 1, 1, 1)
    i = torch.arange(span, device=dev).view(1, 1, span, 1, 1)
    y = torch.arange(2, device=dev).view(1, 1, 1, 2, 1)
    w = torch.arange(3 * span, device=dev).view(1, 1, 1, 1, 3 * span)
    q_pos = t * span + i
    k_pos = t * span - span + w
    valid = (q_pos < seq_len) & (k_pos >= 0) & (k_pos < seq_len)
    qp, kp = q_pos.clamp(max=seq_len - 1), k_pos.clamp(0, seq_len - 1)

    def at(row: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return row[:, pos.flatten()].view(batch, *pos.shape)

    docs, blocks = layout[:, LAYOUT_DOC], layout[:, LAYOUT_BLOCK]
    q_doc, k_doc = at(docs, qp), at(docs, kp)
    allowed = sdar_mask_rule(
        x * seq_len + qp, y * seq_len + kp, q_doc, k_doc, at(blocks, qp), at(blocks, kp),
        seq_len, clean_attention,
    )  # fmt: skip
    reach = torch.where(x == 1, q_pos, q_pos - span)  # the main part's last clean key position
    covered = (q_doc == k_doc) & (y == 1) & (k_pos <= reach)
    return (allowed & valid & ~covered).contiguous()


# --- the main part: variable-length causal attention with bottom-right alignment ---------------------


def _main_forward(q, k, v, plan: SplitPlan, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Output ``[N, h, d]`` and log-sum-exp ``[N, h]`` (``-inf`` for rows without keys)."""
    kb, vb = k.index_select(0, plan.key_rows), v.index_select(0, plan.key_rows)
    if q.is_cuda:  # lse [N, h], -inf for a row without keys (flash attention itself reports +inf)
        return compat.flash_attention_varlen_forward(
            q, kb, vb, plan.cu_q, plan.cu_k, plan.max_q, plan.max_k, scale
        )
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32 if q.dtype != torch.float64 else q.dtype)
    for (q0, q1), (k0, k1) in _segments(plan):
        if k1 > k0:
            mask = _bottom_right_causal(q1 - q0, k1 - k0)
            o, s = _dense_forward(q[q0:q1], kb[k0:k1], vb[k0:k1], mask, scale)
            out[q0:q1], lse[q0:q1] = o.to(q.dtype), s
    return out, lse


def _main_backward(dout, q, k, v, out, lse, plan: SplitPlan, scale: float):
    """Gradients of the main part given the merged output and log-sum-exp; dk/dv over the ``N`` rows."""
    rows = plan.key_rows
    kb, vb = k.index_select(0, rows), v.index_select(0, rows)
    if q.is_cuda:
        dq, dkb, dvb = compat.flash_attention_varlen_backward(
            dout, q, kb, vb, out, lse, plan.cu_q, plan.cu_k, plan.max_q, plan.max_k, scale
        )
    else:
        dq, dkb, dvb = torch.zeros_like(q), torch.zeros_like(kb), torch.zeros_like(vb)
        for (q0, q1), (k0, k1) in _segments(plan):
            if k1 > k0:
                mask = _bottom_right_causal(q1 - q0, k1 - k0)
                grads = _dense_backward(
                    q[q0:q1], kb[k0:k1], vb[k0:k1], dout[q0:q1], out[q0:q1], lse[q0:q1], mask, scale
                )
                dq[q0:q1], dkb[k0:k1], dvb[k0:k1] = (g.to(q.dtype) for g in grads)
    acc = _accumulation_dtype(q.dtype)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device).index_add_(0, rows, dkb.to(acc))
    dv = torch.zeros(v.shape, dtype=acc, device=v.device).index_add_(0, rows, dvb.to(acc))
    return dq, dk, dv


def _segments(plan: SplitPlan):
    q, k = plan.cu_q_host, plan.cu_k_host
    return [((q[j], q[j + 1]), (k[j], k[j + 1])) for j in range(len(q) - 1)]


def _bottom_right_causal(n_q: int, n_k: int) -> torch.Tensor:
    """Query ``i`` sees key ``j`` when ``j <= i + n_k - n_q`` (flash attention's causal alignment)."""
    return torch.ones(n_q, n_k, dtype=torch.bool).tril(diagonal=n_k - n_q)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _expand_groups(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.repeat_interleave(heads // x.shape[-2], dim=-2)


def _dense_forward(q, k, v, mask, scale):
    """Reference attention ``[m, h, d]`` x ``[n, hk, d]`` under ``mask [m, n]``: output and lse."""
    acc = _accumulation_dtype(q.dtype)
    q, k, v = q.to(acc), _expand_groups(k, q.shape[1]).to(acc), _expand_groups(v, q.shape[1]).to(acc)
    scores = torch.einsum("mhd,nhd->hmn", q, k).mul(scale).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    return torch.einsum("hmn,nhd->mhd", probs, v), lse.t()


def _dense_backward(q, k, v, dout, out, lse, mask, scale):
    """Reference gradients of one part of a softmax whose output and lse cover all its parts."""
    acc = _accumulation_dtype(q.dtype)
    heads, groups = q.shape[1], k.shape[1]
    q, dout, out = q.to(acc), dout.to(acc), out.to(acc)
    ke, ve = _expand_groups(k, heads).to(acc), _expand_groups(v, heads).to(acc)
    scores = torch.einsum("mhd,nhd->hmn", q, ke).mul(scale)
    probs = torch.exp(scores - lse.t()[..., None]).masked_fill(~mask, 0.0)
    delta = (dout * out).sum(-1).t()[..., None]
    dscores = probs * (torch.einsum("mhd,nhd->hmn", dout, ve) - delta)
    dq = torch.einsum("hmn,nhd->mhd", dscores, ke) * scale
    dk = torch.einsum("hmn,mhd->nhd", dscores, q) * scale
    dv = torch.einsum("hmn,mhd->nhd", probs, dout)
    n = k.shape[0]
    return dq, dk.view(n, groups, -1, dk.shape[-1]).sum(2), dv.view(n, groups, -1, dv.shape[-1]).sum(2)


# --- the local part ("band"): attention within S - 1 positions of each query ------------------------


def _tiles(q, k, v, b: int, seq: int, span: int, tiles: int):
    """Query tiles ``[b, T, 2, S, hk, g, d]`` and key/value windows ``[b, 2, T, 3S, hk, d]``."""
    acc = _accumulation_dtype(q.dtype)
    heads, groups, dim = q.shape[1], k.shape[1], q.shape[2]
    pad = tiles * span - seq
    qt = q.view(b, 2, seq, heads, dim).to(acc)
    qt = torch.nn.functional.pad(qt, (0, 0, 0, 0, 0, pad)).view(b, 2, tiles, span, groups, -1, dim)

    def windows(x: torch.Tensor) -> torch.Tensor:
        x = x.view(b, 2, seq, groups, dim).to(acc)
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, span, pad + span))
        return x.unfold(2, 3 * span, span).permute(0, 1, 2, 5, 3, 4)

    return qt.transpose(1, 2), windows(k), windows(v)


def _from_tiles(x: torch.Tensor, b: int, seq: int, span: int, tiles: int) -> torch.Tensor:
    """``[b, T, hk, g, 2, S, ...]`` back to ``[b * 2L, h, ...]``."""
    tail = x.shape[6:]
    x = x.permute(0, 4, 1, 5, 2, 3, *range(6, 6 + len(tail)))
    x = x.reshape(b, 2, tiles * span, -1, *tail)[:, :, :seq]
    return x.reshape(b * 2 * seq, -1, *tail)


def _band_tiles(q, k, v, plan: SplitPlan, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The band in plain (differentiable) torch over tiles of ``S`` positions: output and lse."""
    sizes = (plan.batch, plan.seq_len, plan.span, plan.tiles)
    return _band_tiles_core(q, k, v, plan.local_mask, *sizes, scale)


@compiled_on_cuda(dynamic=False)
def _band_tiles_core(q, k, v, local_mask, b: int, seq: int, span: int, tiles: int, scale: float):
    """Disallowed pairs get the dtype's lowest finite value rather than ``-inf``, so a row without
    band keys has finite (unused: its merge weight is 0) values and no NaN reaches the gradients."""
    qt, kt, vt = _tiles(q, k, v, b, seq, span, tiles)
    scores = torch.einsum("btxihgd,bytwhd->bthgxiyw", qt, kt).mul(scale)
    mask = local_mask[:, :, None, None]
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min).flatten(-2)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).view(*scores.shape[:-1], 2, -1)
    out = torch.einsum("bthgxiyw,bytwhd->bthgxid", probs, vt)
    sizes = (b, seq, span, tiles)
    return _from_tiles(out, *sizes), _from_tiles(lse, *sizes)


def band_mask_mod(layout: torch.Tensor, clean_attention: CleanAttention | str, span: int):
    """FlexAttention ``mask_mod`` of the band: the SDAR rule minus what the main part covers."""
    base = sdar_mask_mod(layout, clean_attention)
    seq_len = layout.shape[-1]
    docs = layout[:, LAYOUT_DOC]

    def mask_mod(b, h, q_idx, kv_idx):
        q_clean, kv_clean = q_idx >= seq_len, kv_idx >= seq_len
        q_pos = torch.where(q_clean, q_idx - seq_len, q_idx)
        kv_pos = torch.where(kv_clean, kv_idx - seq_len, kv_idx)
        reach = torch.where(q_clean, q_pos, q_pos - span)
        covered = kv_clean & (kv_pos <= reach) & (docs[b, q_pos] == docs[b, kv_pos])
        return base(b, h, q_idx, kv_idx) & ~covered

    return mask_mod


def _band_flex(q, k, v, plan: SplitPlan, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The band through FlexAttention (CUDA): only the few tiles near the diagonals are visited."""
    from torch.nn.attention.flex_attention import AuxRequest

    from megatron_sdar.attention.flex import compiled_flex_attention

    b, two_l = plan.batch, 2 * plan.seq_len
    qb, kb, vb = (x.view(b, two_l, x.shape[1], x.shape[2]).transpose(1, 2) for x in (q, k, v))
    out, aux = compiled_flex_attention()(
        qb, kb, vb, block_mask=plan.band_block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
        return_aux=AuxRequest(lse=True),
    )  # fmt: skip
    return out.transpose(1, 2).reshape(q.shape), aux.lse.transpose(1, 2).reshape(q.shape[:2])


def _band(q, k, v, plan: SplitPlan, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    if plan.band_block_mask is not None:
        return _band_flex(q, k, v, plan, scale)
    return _band_tiles(q, k, v, plan, scale)


# --- merge --------------------------------------------------------------------------------------------


class _SplitSDARAttention(torch.autograd.Function):
    """Main and band merged by log-sum-exp.

    Backward: the main part's kernel takes the merged output and lse directly. The band is
    recomputed under autograd and differentiated with its output gradient scaled by its merge weight
    ``w`` and an lse gradient ``-w (D - D_band)`` (``D = rowsum(dout * out)``): that turns its own
    softmax gradient into the merged softmax's, so any differentiable band (FlexAttention or torch)
    gives exact gradients without keeping its graph between forward and backward.
    """

    @staticmethod
    def forward(ctx, q, k, v, plan: SplitPlan, scale: float):
        out_main, lse_main = _main_forward(q, k, v, plan, scale)
        out_band, lse_band = _band(q, k, v, plan, scale)
        out, lse = _merge(out_main, lse_main, out_band, lse_band)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale = plan, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        dout = dout.contiguous()
        dq, dk, dv = _main_backward(dout, q, k, v, out, lse, plan, scale)
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_() for x in (q, k, v)]
            out_band, lse_band = _band(*leaves, plan, scale)
            grad_out, grad_lse = _band_output_grads(dout, out, out_band.detach(), lse_band.detach(), lse)
            band = torch.autograd.grad((out_band, lse_band), leaves, (grad_out, grad_lse))
        return (*_add_grads(dq, dk, dv, *band), None, None)


@compiled_on_cuda(dynamic=False)
def _merge(out_main, lse_main, out_band, lse_band):
    """Merged output (input dtype) and log-sum-exp (accumulation dtype) of the two parts."""
    acc = _accumulation_dtype(out_main.dtype)
    lse = torch.logaddexp(lse_main.to(acc), lse_band.to(acc))
    w_main = torch.exp(lse_main - lse)[..., None]
    w_band = torch.exp(lse_band - lse)[..., None]
    main = torch.where(w_main > 0, out_main.to(acc), 0.0)  # rows without main keys hold garbage
    return (w_main * main + w_band * out_band.to(acc)).to(out_main.dtype), lse


@compiled_on_cuda(dynamic=False)
def _band_output_grads(dout, out, out_band, lse_band, lse):
    """The band's output and lse gradients that turn its softmax gradient into the merged one's."""
    acc = lse.dtype
    weight = torch.exp(lse_band.to(acc) - lse)
    dout_acc = dout.to(acc)
    delta = (dout_acc * out.to(acc)).sum(-1)
    delta_band = (dout_acc * out_band.to(acc)).sum(-1)
    grad_out = (weight[..., None] * dout_acc).to(out_band.dtype)
    grad_lse = (-weight * (delta - delta_band)).to(lse_band.dtype)
    return grad_out, grad_lse


@compiled_on_cuda(dynamic=False)
def _add_grads(dq, dk, dv, band_dq, band_dk, band_dv):
    """Main plus band gradients, summed in the accumulation dtype (``dk``/``dv`` already are)."""
    acc = dk.dtype
    return (
        (dq.to(acc) + band_dq.to(acc)).to(band_dq.dtype),
        (dk + band_dk.to(acc)).to(band_dk.dtype),
        (dv + band_dv.to(acc)).to(band_dv.dtype),
    )


def split_sdar_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: SplitPlan, scale: float
) -> torch.Tensor:
    """SDAR attention for ``[b, 2L, h, d]`` queries and ``[b, 2L, hk, d]`` keys/values."""
    b, two_l, heads, dim = query.shape
    if (b, two_l) != (plan.batch, 2 * plan.seq_len) or key.shape[:2] != query.shape[:2]:
        raise ValueError(
            f"split SDAR attention: inputs {tuple(query.shape)} / {tuple(key.shape)} do not match the "
            f"layout's {plan.batch} rows x 2 x {plan.seq_len} tokens"
        )
    if heads % key.shape[2] != 0:
        raise ValueError(f"{heads} query heads are not a multiple of {key.shape[2]} key/value heads")
    if query.is_cuda and query.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"the split SDAR attention runs flash attention on CUDA, which needs fp16 or bf16, got "
            f"{query.dtype}; train with --bf16 or use --sdar-attention-backend flex"
        )
    q, k, v = (x.reshape(b * two_l, x.shape[2], dim).contiguous() for x in (query, key, value))
    out = _SplitSDARAttention.apply(q, k, v, plan, scale)
    return out.view(b, two_l, heads, dim)
