#!/usr/bin/env python3
"""SDAR-mask attention vs causal flash attention over the same 2L tokens (target T1), on CUDA.

    python benchmarks/attention.py                       # L in {2048, 4096, 8192}, B in {4, 16, 64}
    python benchmarks/attention.py --seq-lengths 4096 --block-sizes 4 --out results.json
    python benchmarks/attention.py --check               # flex vs dense-SDPA agreement first

For each (L, B): forward+backward time of ``SDARCoreAttention`` (FlexAttention with the cached
``BlockMask``) on a packed window against ``scaled_dot_product_attention(is_causal=True)`` over
2L tokens, bf16, batch 1, Qwen3-1.7B attention shape (16 query / 8 KV heads, head dim 128); the
time to build the ``BlockMask`` is measured separately. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
warnings.filterwarnings("ignore")


def causal_step(q, k, v) -> None:
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out.backward(torch.ones_like(out))


def sdar_step(module, q, k, v, layout) -> None:
    out = module(q, k, v, layout)
    out.backward(torch.ones_like(out))


def cuda_time(fn, warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn()`` measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def make_layout(seq: int, block: int, doc_len: int, device) -> torch.Tensor:
    from megatron_sdar.masks import document_ids_from_lengths
    from megatron_sdar.masks import make_layout as layout_of

    lengths = [doc_len] * (seq // doc_len) + ([seq % doc_len] if seq % doc_len else [])
    return layout_of(document_ids_from_lengths(lengths, device=device).unsqueeze(0), block, "document")


def attention_module(backend: str, heads: int, groups: int, head_dim: int):
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_sdar.attention import SDARCoreAttention, SDARMaskCache
    from megatron_sdar.model import qwen3_transformer_config

    config = qwen3_transformer_config(
        num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads, num_query_groups=groups,
        kv_channels=head_dim,
    )  # fmt: skip
    return SDARCoreAttention(
        config, 1, AttnMaskType.arbitrary, "self", backend=backend, mask_cache=SDARMaskCache()
    )


def qkv(seq2: int, heads: int, groups: int, head_dim: int, device, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    shape_q, shape_kv = (seq2, 1, heads, head_dim), (seq2, 1, groups, head_dim)
    q = torch.randn(shape_q, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()
    k = torch.randn(shape_kv, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()
    v = torch.randn(shape_kv, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()
    return q, k, v


def check(args) -> dict:
    """Flex vs dense-mask SDPA outputs and gradients on a multi-document layout (bf16)."""
    results = {}
    for clean in ("block_causal", "causal"):
        layout = make_layout(1024, 4, 300, "cuda")
        outs = {}
        for backend in ("flex", "sdpa"):
            module = attention_module(backend, args.heads, args.kv_heads, args.head_dim)
            module.clean_attention = type(module.clean_attention)(clean)
            q, k, v = qkv(2048, args.heads, args.kv_heads, args.head_dim, "cuda")
            out = module(q, k, v, layout)
            out.float().pow(2).sum().backward()
            outs[backend] = (out.float(), q.grad.float(), k.grad.float(), v.grad.float())
        diffs = {
            name: ((a - b).abs().max() / (b.abs().max() + 1e-6)).item()
            for name, a, b in zip(("out", "dq", "dk", "dv"), outs["flex"], outs["sdpa"])
        }
        results[clean] = diffs
        print(
            f"check {clean}: max relative diff flex vs sdpa "
            + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
        )
    return results


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-lengths", type=int, nargs="+", default=[2048, 4096, 8192], help="clean window L")
    p.add_argument("--block-sizes", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument(
        "--doc-length", type=int, default=0, help="pack documents of this length (0: one document)"
    )
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--check", action="store_true", help="compare flex and dense SDPA first")
    p.add_argument("--out", default=None, help="write results as JSON here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (FlexAttention kernels are compiled for it)")

    from megatron_sdar.masks import build_block_mask

    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    if args.check:
        results["check"] = check(args)
    print(f"{'L':>6} {'B':>4} {'sdar ms':>9} {'causal ms':>10} {'ratio':>7} {'mask ms':>8} {'density':>8}")
    for seq in args.seq_lengths:
        q, k, v = qkv(2 * seq, args.heads, args.kv_heads, args.head_dim, "cuda")
        qc, kc, vc = (t.detach().permute(1, 2, 0, 3).contiguous().requires_grad_() for t in (q, k, v))
        causal_ms = cuda_time(partial(causal_step, qc, kc, vc), args.warmup, args.iters)
        for block in args.block_sizes:
            layout = make_layout(seq, block, args.doc_length or seq, "cuda")
            module = attention_module("flex", args.heads, args.kv_heads, args.head_dim)
            sdar_ms = cuda_time(partial(sdar_step, module, q, k, v, layout), args.warmup, args.iters)
            build = partial(build_block_mask, layout, "block_causal", compile=True)
            mask_ms = cuda_time(build, 2, 5)  # the warm-up compiles it
            density = (seq * seq + seq * block) / (2 * seq) ** 2 if not args.doc_length else float("nan")
            row = dict(L=seq, B=block, sdar_ms=sdar_ms, causal_ms=causal_ms, ratio=sdar_ms / causal_ms,
                       mask_ms=mask_ms, density=density)  # fmt: skip
            results["rows"].append(row)
            print(f"{seq:>6} {block:>4} {sdar_ms:>9.3f} {causal_ms:>10.3f} {sdar_ms / causal_ms:>7.3f} "
                  f"{mask_ms:>8.3f} {density:>8.3f}")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
