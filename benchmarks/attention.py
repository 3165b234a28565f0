#!/usr/bin/env python3
"""SDAR-mask attention against causal flash attention over the same 2L tokens (target T1). CUDA only.

For each clean window length ``L`` and SDAR block size ``B`` the benchmark times one forward plus
backward pass of

* SDAR attention over ``[x_t ; x_0]`` (2L tokens) under the SDAR mask, through the library
  (``SDARCoreAttention``, ``--path library``, the default) with each of ``--backends``: ``flex``
  (FlexAttention) and ``split`` (variable-length causal flash attention plus a local band, merged by
  log-sum-exp), or through a compiled ``flex_attention`` fed the library's ``BlockMask``
  (``--path direct``, flex only);
* ``scaled_dot_product_attention(is_causal=True)`` over 2L tokens (the flash kernel);

in bf16, batch 1, 16 query heads / 8 KV heads (GQA through ``enable_gqa``), head dim 128 (the
Qwen3-1.7B attention shape). Each measurement runs warm-up iterations first (which also compile),
then times ``--iters`` iterations with CUDA events and reports the median. Building the mask
(the compiled ``BlockMask`` for flex, the split plan for split) is timed separately, since one mask
serves every layer of a micro-batch.

Columns: ``backend``, ``sdar ms`` and ``causal ms`` (forward+backward), ``ratio`` (sdar / causal;
T1 asks for <= 0.60 at L=4096, B=4), ``mask ms`` (building that backend's mask), ``density``
(allowed entries of the 2L x 2L matrix) and ``tiles`` (fraction of 128 x 128 tiles FlexAttention
visits).

Usage::

    python benchmarks/attention.py                                  # L 2048 4096 8192, B 4 16 64
    python benchmarks/attention.py --seq-lengths 4096 --block-sizes 4 --out t1.json
    python benchmarks/attention.py --path direct --doc-length 1000  # packed 1000-token documents
    python benchmarks/attention.py --check                          # flex vs dense-mask SDPA only
    python benchmarks/attention.py --sweep --seq-lengths 4096 --block-sizes 4   # tune kernel options
    python benchmarks/attention.py --fa4      # also FlashAttention-4's causal kernel (flash-attn-4)

``--kernel-options`` passes FlexAttention kernel options (JSON) to every SDAR measurement; ``--sweep``
times a list of candidate options (tile sizes, warps, stages, TMA, row safety) at the first ``L``
and ``B``, then their best forward and backward choices combined, and reports the fastest: the
value to give ``--sdar-flex-kernel-options``.

``--fa4`` also times FlashAttention-4's causal kernel over the same 2L tokens (``flash_attn.cute``
from the ``flash-attn-4`` package, compiled on first use; not a library back end), reported under
``fa4_causal`` with its ratio to the SDPA causal kernel: the per-tile speed an FA4-based SDAR kernel
could reach. Without the package it is skipped and the reason recorded.

``--check`` compares the output and gradients of both backends with ``scaled_dot_product_attention``
under the dense mask of ``megatron_sdar.masks.dense_sdar_mask`` on a small multi-document window
(bf16, both clean-half variants), prints the largest differences, and exits non-zero when one
exceeds the tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.timing import cuda_time, wall_time  # noqa: E402
from megatron_sdar.training.arguments import json_object  # noqa: E402

TILE = 128  # FlexAttention's default BlockMask tile


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="SDAR-mask attention vs causal SDPA over 2L tokens, forward+backward (CUDA).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--seq-lengths", type=int, nargs="+", default=[2048, 4096, 8192], help="clean window L")
    p.add_argument("--block-sizes", type=int, nargs="+", default=[4, 16, 64], help="SDAR block sizes B")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16, help="query heads")
    p.add_argument("--kv-heads", type=int, default=8, help="key/value heads (GQA)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument(
        "--doc-length", type=int, default=0, help="pack documents of this many tokens (0: one per window)"
    )
    p.add_argument("--clean-attention", choices=["block_causal", "causal"], default="block_causal")
    p.add_argument(
        "--path",
        choices=["library", "direct"],
        default="library",
        help="library: SDARCoreAttention; direct: torch.compile(flex_attention) (flex only)",
    )
    p.add_argument(
        "--backends",
        nargs="+",
        choices=["flex", "split", "split-tiles"],
        default=["flex", "split"],
        help="SDAR attention back ends to time (library path); split-tiles: the split back end with "
        "its band as compiled torch tiles instead of FlexAttention",
    )
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations (these also compile)")
    p.add_argument("--iters", type=int, default=20, help="timed iterations (median reported)")
    p.add_argument(
        "--kernel-options", type=json_object, default=None, help="FlexAttention kernel options (JSON)"
    )
    p.add_argument("--sweep", action="store_true", help="time candidate kernel options at the first L and B")
    p.add_argument("--check", action="store_true", help="only compare flex with dense-mask SDPA, then exit")
    p.add_argument("--check-length", type=int, default=1024, help="clean window L for --check")
    p.add_argument("--check-block-size", type=int, default=4, help="SDAR block size for --check")
    p.add_argument(
        "--tolerance",
        type=float,
        default=2e-2,
        help="--check fails when max |flex - sdpa| > tolerance * max |sdpa| for any tensor",
    )
    p.add_argument(
        "--fa4", action="store_true", help="also time FlashAttention-4's causal kernel (package flash-attn-4)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    args = p.parse_args(argv)
    for name in ("seq_lengths", "block_sizes"):
        if any(v < 1 for v in getattr(args, name)):
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.heads % args.kv_heads != 0:
        p.error(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    return args


# ---------------------------------------------------------------------------------------------------
# inputs


def doc_lengths(seq_len: int, doc_length: int) -> list[int]:
    """Documents of ``doc_length`` tokens filling ``seq_len`` (the last one shorter); one if 0."""
    if doc_length <= 0 or doc_length >= seq_len:
        return [seq_len]
    return [doc_length] * (seq_len // doc_length) + ([seq_len % doc_length] if seq_len % doc_length else [])


def make_layout(batch: int, lengths: list[int], block_size: int, device) -> torch.Tensor:
    """The ``[batch, 2, L]`` layout of a packed window (blocks counted per document)."""
    from megatron_sdar.masks import document_ids_from_lengths
    from megatron_sdar.masks import make_layout as layout_of

    doc_ids = document_ids_from_lengths(lengths, device=device).unsqueeze(0).expand(batch, -1)
    return layout_of(doc_ids.contiguous(), block_size, "document")


def random_qkv(args, seq2: int, device, dtype=torch.bfloat16, seed: int = 0):
    """Query ``[b, h, 2L, d]``, key/value ``[b, kv, 2L, d]`` and an output gradient, leaf tensors."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(heads: int) -> torch.Tensor:
        shape = (args.batch, heads, seq2, args.head_dim)
        return torch.randn(shape, device=device, dtype=dtype, generator=gen)

    q, k, v, grad = randn(args.heads), randn(args.kv_heads), randn(args.kv_heads), randn(args.heads)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), grad


def mask_density(layout: torch.Tensor, clean_attention: str, rows: int = 1024) -> float:
    """Fraction of allowed entries of the ``[2L, 2L]`` SDAR mask, counted in slabs of query rows."""
    from megatron_sdar.masks import LAYOUT_BLOCK, LAYOUT_DOC, CleanAttention, sdar_mask_rule

    seq_len = layout.shape[-1]
    doc2 = layout[:, LAYOUT_DOC].repeat(1, 2)
    blk2 = layout[:, LAYOUT_BLOCK].repeat(1, 2)
    idx = torch.arange(2 * seq_len, device=layout.device)
    allowed = 0
    for lo in range(0, 2 * seq_len, rows):
        q = slice(lo, min(lo + rows, 2 * seq_len))
        allowed += int(
            sdar_mask_rule(
                idx[q, None], idx[None, :], doc2[:, q, None], doc2[:, None, :], blk2[:, q, None],
                blk2[:, None, :], seq_len, CleanAttention(clean_attention),
            ).sum()
        )  # fmt: skip
    return allowed / (layout.shape[0] * (2 * seq_len) ** 2)


def tile_density(block_mask) -> float:
    """Fraction of ``TILE x TILE`` tiles the kernel visits (partial or full)."""
    return 1.0 - block_mask.sparsity() / 100.0


def fwd_bwd(attend: Callable, q, k, v, grad) -> Callable[[], object]:
    """One forward and backward pass; gradients are returned, not accumulated into ``.grad``."""

    def step():
        out = attend(q, k, v)
        return torch.autograd.grad(out, (q, k, v), grad)

    return step


def causal_attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def library_attention(
    args,
    clean_attention: str,
    layout: torch.Tensor,
    kernel_options: dict | None = None,
    backend: str = "flex",
):
    """``SDARCoreAttention`` as Megatron calls it: ``[s, b, h, d]`` in, ``[s, b, h*d]``
    out, with the mask built once per layout by its cache."""
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_sdar.attention.cache import SDARMaskCache
    from megatron_sdar.attention.core import SDARCoreAttention
    from megatron_sdar.model.base import qwen3_transformer_config

    config = qwen3_transformer_config(
        num_layers=1,
        hidden_size=args.heads * args.head_dim,
        num_attention_heads=args.heads,
        num_query_groups=args.kv_heads,
        kv_channels=args.head_dim,
    )
    band = "tiles" if backend == "split-tiles" else "auto"
    module = SDARCoreAttention(
        config, 1, AttnMaskType.arbitrary, "self", clean_attention=clean_attention,
        backend=backend.removesuffix("-tiles"), mask_cache=SDARMaskCache(split_band=band),
        kernel_options=kernel_options,
    )  # fmt: skip
    return lambda q, k, v: module(q, k, v, layout)


def to_sbhd(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """``[b, h, s, d]`` leaf tensors as contiguous ``[s, b, h, d]`` leaf tensors (Megatron's layout)."""
    return [t.detach().permute(2, 0, 1, 3).contiguous().requires_grad_(t.requires_grad) for t in tensors]


def library_bhsd(args, clean_attention: str, layout: torch.Tensor, backend: str = "flex") -> Callable:
    """The library path taking and returning ``[b, h, s, d]`` tensors (for comparisons only)."""
    attend = library_attention(args, clean_attention, layout, backend=backend)

    def wrapped(q, k, v):
        out = attend(*(t.permute(2, 0, 1, 3) for t in (q, k, v)))  # [s, b, h*d]
        return out.view(out.shape[0], out.shape[1], q.shape[1], -1).permute(1, 2, 0, 3)

    return wrapped


_compiled_flex = None


def direct_attention(block_mask, kernel_options: dict | None = None) -> Callable:
    """``torch.compile(flex_attention)`` on ``[b, h, s, d]`` tensors with the given ``BlockMask``."""
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    flex = _compiled_flex

    def attend(q, k, v):
        return flex(
            q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1], kernel_options=kernel_options
        )

    return attend


def fa4_causal_attention() -> tuple[Callable | None, str | None]:
    """FlashAttention-4's causal kernel on ``[b, s, h, d]`` tensors, or why it cannot run here."""
    try:
        from flash_attn.cute import flash_attn_func
    except Exception as exc:  # not installed, or its CUDA libraries do not load
        reason = f"flash_attn.cute (package flash-attn-4) not importable: {type(exc).__name__}: {exc}"
        return None, reason[:500]
    return (lambda q, k, v: flash_attn_func(q, k, v, causal=True)[0]), None


def time_fa4_causal(args, q, k, v, grad, causal_ms: float) -> dict:
    """One ``fa4_causal`` row: FA4's causal forward+backward over the 2L tokens of ``q``."""
    seq2 = q.shape[2]
    attend, reason = fa4_causal_attention()
    row: dict = {"L": seq2 // 2, "causal_ms": causal_ms}
    if attend is not None:
        # [b, h, s, d] -> contiguous [b, s, h, d] leaf tensors (FA4's layout; GQA is native)
        inputs = [
            t.detach().transpose(1, 2).contiguous().requires_grad_(t.requires_grad) for t in (q, k, v, grad)
        ]
        try:
            ms = cuda_time(fwd_bwd(attend, *inputs), args.warmup, args.iters)
            row.update(fa4_causal_ms=ms, ratio=ms / causal_ms)
        except Exception as exc:  # a kernel that does not compile or run on this GPU is a result
            reason = f"{type(exc).__name__}: {exc}"[:500]
        del inputs
    if reason is not None:
        row["skipped"] = reason
        print(f"{seq2 // 2:>6} {'-':>4} {'fa4-causal':>11}  skipped: {reason[:200]}")
    else:
        print(f"{seq2 // 2:>6} {'-':>4} {'fa4-causal':>11} {row['fa4_causal_ms']:>9.3f} {causal_ms:>10.3f} "
              f"{row['ratio']:>7.3f}")  # fmt: skip
    return row


def benchmark(args, extra: dict | None = None) -> list[dict]:
    """The T1 rows; with ``--fa4``, FA4's causal rows go to ``extra["fa4_causal"]``."""
    from megatron_sdar.attention.flex import build_block_mask
    from megatron_sdar.attention.split import build_split_plan

    backends = args.backends if args.path == "library" else ["flex"]
    rows = []
    header = (
        f"{'L':>6} {'B':>4} {'backend':>11} {'sdar ms':>9} {'causal ms':>10} {'ratio':>7} {'mask ms':>8} "
        f"{'density':>8} {'tiles':>7}"
    )
    print(f"path={args.path} clean={args.clean_attention} batch={args.batch} heads={args.heads}/"
          f"{args.kv_heads} head_dim={args.head_dim} doc_length={args.doc_length or 'L'} bf16")  # fmt: skip
    print(header)
    print("-" * len(header))
    for seq_len in args.seq_lengths:
        q, k, v, grad = random_qkv(args, 2 * seq_len, "cuda", seed=args.seed)
        causal_ms = cuda_time(fwd_bwd(causal_attention, q, k, v, grad), args.warmup, args.iters)
        if args.fa4 and extra is not None:
            extra.setdefault("fa4_causal", []).append(time_fa4_causal(args, q, k, v, grad, causal_ms))
        for block in args.block_sizes:
            if seq_len % block:
                print(f"{seq_len:>6} {block:>4}  skipped: L is not a multiple of B")
                continue
            layout = make_layout(args.batch, doc_lengths(seq_len, args.doc_length), block, "cuda")
            builders = {
                "flex": lambda layout=layout: build_block_mask(layout, args.clean_attention, compile=True),
                "split": lambda layout=layout: build_split_plan(layout, args.clean_attention),
                "split-tiles": lambda layout=layout: build_split_plan(layout, args.clean_attention, "tiles"),
            }
            block_mask = builders["flex"]()
            density, tiles = mask_density(layout, args.clean_attention), tile_density(block_mask)
            for backend in backends:
                # warm-up compiles the flex mask builder
                mask_ms = wall_time(builders[backend], warmup=2, iters=max(5, args.iters // 2))
                if args.path == "library":
                    attend = library_attention(
                        args, args.clean_attention, layout, args.kernel_options, backend=backend
                    )
                    grad_sbhd = grad.permute(2, 0, 1, 3).reshape(2 * seq_len, args.batch, -1)
                    inputs = (*to_sbhd(q, k, v), grad_sbhd)
                else:
                    attend, inputs = direct_attention(block_mask, args.kernel_options), (q, k, v, grad)
                sdar_ms = cuda_time(fwd_bwd(attend, *inputs), args.warmup, args.iters)
                del inputs
                row = dict(
                    L=seq_len,
                    B=block,
                    backend=backend,
                    sdar_ms=sdar_ms,
                    causal_ms=causal_ms,
                    ratio=sdar_ms / causal_ms,
                    mask_ms=mask_ms,
                    density=density,
                    tile_density=tiles,
                )
                rows.append(row)
                print(
                    f"{seq_len:>6} {block:>4} {backend:>11} {sdar_ms:>9.3f} {causal_ms:>10.3f} "
                    f"{row['ratio']:>7.3f} {mask_ms:>8.3f} {density:>8.3f} {tiles:>7.3f}"
                )
        del q, k, v, grad
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------------
# kernel-option sweep

FWD = {
    "fwd 128x64 w8 s3": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 8, "fwd_num_stages": 3},
    "fwd 128x128 w8 s2": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_warps": 8, "fwd_num_stages": 2},
    "fwd 64x128 w4 s3": {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 128, "fwd_num_warps": 4, "fwd_num_stages": 3},
}
BWD = {
    "bwd 64/128 w8 s2": {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 64,
                         "bwd_num_warps": 8, "bwd_num_stages": 2},
    "bwd 32/128 w4 s3": {"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 32,
                         "bwd_num_warps": 4, "bwd_num_stages": 3},
    "bwd 64/64 w4 s3": {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64,
                        "bwd_num_warps": 4, "bwd_num_stages": 3},
}  # fmt: skip
FLAGS = {"rows safe": {"ROWS_GUARANTEED_SAFE": True}, "TMA": {"USE_TMA": True}}


def sweep(args) -> dict:
    """Time candidate kernel options at the first (L, B); combine the best of each kind."""
    seq_len, block = args.seq_lengths[0], args.block_sizes[0]
    q, k, v, grad = random_qkv(args, 2 * seq_len, "cuda", seed=args.seed)
    layout = make_layout(args.batch, doc_lengths(seq_len, args.doc_length), block, "cuda")
    inputs = (*to_sbhd(q, k, v), grad.permute(2, 0, 1, 3).reshape(2 * seq_len, args.batch, -1))
    causal_ms = cuda_time(fwd_bwd(causal_attention, q, k, v, grad), args.warmup, args.iters)
    print(f"sweep at L={seq_len} B={block} (library path, fwd+bwd); causal SDPA over 2L: {causal_ms:.3f} ms")
    results: dict[str, dict] = {}

    def measure(name: str, options: dict) -> float | None:
        try:
            attend = library_attention(args, args.clean_attention, layout, options or None)
            ms = cuda_time(fwd_bwd(attend, *inputs), args.warmup, args.iters)
        except Exception as exc:  # an option set the compiler rejects is a result, not a crash
            results[name] = {"options": options, "error": f"{type(exc).__name__}: {exc}"[:300]}
            print(f"  {name:<22} failed: {results[name]['error'][:120]}", flush=True)
            return None
        results[name] = {"options": options, "ms": ms, "ratio": ms / causal_ms}
        print(f"  {name:<22} {ms:8.3f} ms  ratio {ms / causal_ms:.3f}", flush=True)
        return ms

    base = measure("default", {})
    picked: dict = {}
    for group in (FWD, BWD, FLAGS):
        timed = {name: measure(name, opts) for name, opts in group.items()}
        timed = {n: t for n, t in timed.items() if t is not None}
        if timed and base is not None and min(timed.values()) < base:
            picked.update(group[min(timed, key=timed.get)])
    if picked:
        measure("combined", picked)
    ok = {n: r for n, r in results.items() if "ms" in r}
    best = min(ok, key=lambda n: ok[n]["ms"]) if ok else None
    if best:
        print(f"best: {best} ({ok[best]['ms']:.3f} ms, ratio {ok[best]['ratio']:.3f}); "
              f"--sdar-flex-kernel-options '{json.dumps(ok[best]['options'])}'")  # fmt: skip
    return {"L": seq_len, "B": block, "causal_ms": causal_ms, "candidates": results, "best": best}


# ---------------------------------------------------------------------------------------------------
# correctness


def check(args) -> tuple[dict, bool]:
    """Flex (library and direct) and split vs dense-mask SDPA, output and input gradients, bf16."""
    from megatron_sdar.attention.flex import build_block_mask
    from megatron_sdar.masks import dense_sdar_mask

    seq_len, block = args.check_length, args.check_block_size
    if seq_len % block:
        raise SystemExit(f"--check-length {seq_len} is not a multiple of --check-block-size {block}")
    # Uneven documents (block boundaries and 128-token tiles fall inside documents) and a short tail.
    lengths = [n for n in (seq_len * 3 // 10, seq_len // 5 + 3, seq_len // 3 + 1) if n > 0]
    lengths.append(seq_len - sum(lengths))
    lengths = [n for n in lengths if n > 0]
    layout = make_layout(args.batch, lengths, block, "cuda")
    q, k, v, grad = random_qkv(args, 2 * seq_len, "cuda", seed=args.seed)
    names = ("out", "dq", "dk", "dv")
    results, ok = {}, True
    print(f"check: L={seq_len} B={block} documents={lengths} bf16, tolerance {args.tolerance} x max|sdpa|")
    for clean in ("block_causal", "causal"):
        dense = dense_sdar_mask(layout, clean)

        def sdpa(q, k, v, dense=dense):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True)

        reference = [sdpa(q, k, v).detach(), *fwd_bwd(sdpa, q, k, v, grad)()]
        candidates = {
            "library": library_bhsd(args, clean, layout),
            "direct": direct_attention(build_block_mask(layout, clean, compile=True)),
            "split": library_bhsd(args, clean, layout, backend="split"),
            "split-tiles": library_bhsd(args, clean, layout, backend="split-tiles"),
        }
        for path, attend in candidates.items():
            got = [attend(q, k, v).detach(), *fwd_bwd(attend, q, k, v, grad)()]
            diffs = {}
            for name, a, b in zip(names, got, reference):
                abs_diff = (a.float() - b.float()).abs().max().item()
                scale = b.float().abs().max().item()
                diffs[name] = dict(max_abs_diff=abs_diff, max_abs_ref=scale)
                ok &= abs_diff <= args.tolerance * scale
            results[f"{clean}/{path}"] = diffs
            shown = [
                f"{n} {d['max_abs_diff']:.3e} (max|ref| {d['max_abs_ref']:.2f})" for n, d in diffs.items()
            ]
            print(f"  {clean:>12} {path:>7}: max |got - sdpa|: " + ", ".join(shown))
    print("check passed" if ok else "check FAILED")
    return results, ok


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "attention.py needs a CUDA GPU: it times compiled FlexAttention and flash-attention "
            "kernels, which do not run on CPU. Nothing was measured.",
            file=sys.stderr,
        )
        return 2
    warnings.filterwarnings("ignore")
    # Every (L, B) pair compiles its own kernels; keep Dynamo from falling back to eager mode.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.accumulated_recompile_limit = max(
        torch._dynamo.config.accumulated_recompile_limit, 1024
    )
    results: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    status = 0
    if args.check:
        results["check"], ok = check(args)
        status = 0 if ok else 1
    elif args.sweep:
        results["sweep"] = sweep(args)
    else:
        results["rows"] = benchmark(args, results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
