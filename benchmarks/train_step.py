#!/usr/bin/env python3
"""Training-step throughput of the SDAR and AR objectives on one GPU (targets T2, T2b and T3).

One process builds the same model (Qwen3-1.7B shape by default, random init, bf16) once per
objective and times forward+backward steps:

* ``sdar``: ``SDARModel`` over ``[x_t ; x_0]`` (2L tokens) under the SDAR mask (FlexAttention), the
  output layer and cross-entropy on the masked tokens of the noised half only (``--output-positions
  noised``: the whole noised half) (Megatron-Core, this library);
* ``sdar-split`` (opt-in, not run by default: never measured on a GPU yet): the same with the
  ``split`` attention back end (variable-length flash attention plus a FlexAttention band,
  :mod:`megatron_sdar.attention.split`; ``--split-band tiles``: the band as compiled torch tiles);
* ``ar``: Megatron-Core's ``GPTModel`` (as :class:`megatron_sdar.model.ARModel`, RoPE in the core
  attention like the SDAR model) with the causal-LM loss over L tokens (flash SDPA attention,
  :func:`megatron_sdar.model.ar_layer_spec`);
* ``hf-sdar``: the way the released SDAR code trains: ``transformers``' ``Qwen3ForCausalLM`` with
  FlexAttention over ``[x_t ; x_0]`` and logits on both halves (needs ``transformers``).

For every objective it walks up the micro-batch sizes until one runs out of memory, and reports
per size: ms per step (median), data tokens/s (clean tokens, L per window), peak memory and the
model FLOPs utilisation from :mod:`megatron_sdar.training.flops` (body per processed token, output layer
where it runs, attention over allowed entries only). The summary gives T2 (sdar / ar data tokens/s,
each at its best micro-batch and at equal micro-batch) and T2b (sdar / hf-sdar). An optimizer step
is not included (T2b's published figures are forward+backward only).

Usage::

    python benchmarks/train_step.py                              # sdar, ar, hf-sdar; L=4096
    python benchmarks/train_step.py --objectives sdar ar --micro-batch-sizes 1 2 4 --out t2.json
    python benchmarks/train_step.py --objectives sdar sdar-split ar   # opt in to the split back end
    python benchmarks/train_step.py --num-layers 4 --seq-length 1024   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.timing import cuda_time  # noqa: E402
from megatron_sdar.training.arguments import json_object  # noqa: E402

OBJECTIVES = ("sdar", "sdar-split", "ar", "hf-sdar")
# the objectives measured so far (docs/performance.md); sdar-split is opt-in until it has been measured
DEFAULT_OBJECTIVES = ("sdar", "ar", "hf-sdar")
SDAR_BACKENDS = {"sdar": "flex", "sdar-split": "split"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="SDAR vs AR training-step throughput and MFU (CUDA).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--objectives",
        nargs="+",
        choices=OBJECTIVES,
        default=list(DEFAULT_OBJECTIVES),
        help="what to time; sdar-split (the split attention back end) is opt-in: it has not been "
        "measured on a GPU yet",
    )
    p.add_argument("--seq-length", type=int, default=4096, help="clean window L")
    p.add_argument("--block-size", type=int, default=4)
    p.add_argument("--micro-batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--num-layers", type=int, default=28)
    p.add_argument("--hidden-size", type=int, default=2048)
    p.add_argument("--num-attention-heads", type=int, default=16)
    p.add_argument("--num-query-groups", type=int, default=8)
    p.add_argument("--kv-channels", type=int, default=128)
    p.add_argument("--ffn-hidden-size", type=int, default=6144)
    p.add_argument("--vocab-size", type=int, default=151936)
    p.add_argument("--untie-embeddings", action="store_true", help="Qwen3-1.7B ties them")
    p.add_argument("--recompute", choices=["none", "selective", "full"], default="none")
    p.add_argument(
        "--no-fusions",
        action="store_true",
        help="turn off Megatron's compiled bias-SwiGLU, bias-dropout-add and cross-entropy fusions "
        "(on by default, as in the training loop's defaults plus --cross-entropy-loss-fusion)",
    )
    p.add_argument(
        "--kernel-options", type=json_object, default=None, help="FlexAttention kernel options (JSON)"
    )
    p.add_argument(
        "--kernel-options-from",
        type=Path,
        default=None,
        help="take the best options of an attention.py --sweep JSON",
    )
    p.add_argument(
        "--split-band",
        choices=["auto", "tiles"],
        default="auto",
        help="sdar-split: the band kernel of the split back end (tiles: compiled torch tiles instead of "
        "FlexAttention, as attention.py's split-tiles)",
    )
    p.add_argument(
        "--output-positions",
        choices=["masked", "noised"],
        default="masked",
        help="SDAR objectives: output layer and loss on the masked tokens only (the training loop's "
        "default at TP=1) or on the whole noised half",
    )
    p.add_argument("--profile", action="store_true", help="profile two steps of the first objective and size")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (these also compile)")
    p.add_argument("--iters", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    return p.parse_args(argv)


def init_world() -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_sdar.local_world import free_port

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    torch.cuda.set_device(0)
    torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(0)


def transformer_config(args):
    from megatron_sdar.model.base import qwen3_transformer_config

    recompute = {}
    if args.recompute == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif args.recompute == "selective":
        recompute = dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    fusions = {}
    if not args.no_fusions:
        fusions = dict(
            bias_activation_fusion=True, bias_dropout_fusion=True, cross_entropy_loss_fusion=True,
            cross_entropy_fusion_impl="native",
        )  # fmt: skip
    return qwen3_transformer_config(
        **fusions, num_layers=args.num_layers, hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels, ffn_hidden_size=args.ffn_hidden_size, bf16=True,
        params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16, **recompute,
    )  # fmt: skip


def sdar_config(args, objective: str = "sdar"):
    from megatron_sdar.config import SDARConfig

    return SDARConfig(
        block_size=args.block_size, mask_token_id=args.vocab_size - 1,
        attention_backend=SDAR_BACKENDS.get(objective, "flex"), flex_kernel_options=args.kernel_options,
    )  # fmt: skip


def make_batch(args, micro_batch: int, generator: torch.Generator):
    from megatron_sdar.batch import build_sdar_batch

    tokens = torch.randint(
        0, args.vocab_size - 1, (micro_batch, args.seq_length), device="cuda", generator=generator
    )
    doc_ids = torch.zeros_like(tokens, dtype=torch.int32)
    eligible = torch.ones_like(tokens, dtype=torch.bool)
    return build_sdar_batch(tokens, doc_ids, eligible, sdar_config(args), generator)


def build_model(args, objective: str) -> torch.nn.Module:
    tied = not args.untie_embeddings
    if objective == "hf-sdar":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        cfg = Qwen3Config(
            vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=args.ffn_hidden_size,
            num_hidden_layers=args.num_layers, num_attention_heads=args.num_attention_heads,
            num_key_value_heads=args.num_query_groups, head_dim=args.kv_channels,
            max_position_embeddings=2 * args.seq_length, tie_word_embeddings=tied,
        )  # fmt: skip
        cfg._attn_implementation = "flex_attention"
        return Qwen3ForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16)
    config = transformer_config(args)
    if objective in SDAR_BACKENDS:
        from megatron_sdar.model.sdar import build_sdar_model

        model = build_sdar_model(
            config, sdar_config(args, objective), vocab_size=args.vocab_size,
            max_sequence_length=2 * args.seq_length, share_embeddings_and_output_weights=tied,
        ).cuda()  # fmt: skip
        if SDAR_BACKENDS[objective] == "split":  # the cache its layers share builds the split plans
            model.mask_cache.split_band = args.split_band
        return model
    from megatron_sdar.model.ar import ARModel
    from megatron_sdar.model.specs import ar_layer_spec

    return ARModel(
        config=config, transformer_layer_spec=ar_layer_spec(config), vocab_size=args.vocab_size,
        max_sequence_length=args.seq_length, position_embedding_type="rope",
        share_embeddings_and_output_weights=tied,
    ).cuda()  # fmt: skip


def step_fn(args, objective: str, model, batch) -> Callable[[], None]:
    """One forward+backward of ``objective`` on ``batch`` (gradients cleared first, not accumulated)."""
    from megatron_sdar.loss import sdar_loss
    from megatron_sdar.training.step import ar_forward

    if objective in SDAR_BACKENDS:
        from megatron_sdar.model.sdar import masked_loss_index

        # the training loop builds it on the host from the data loader's tensors
        loss_index = masked_loss_index(batch.masked) if args.output_positions == "masked" else None

        def step():
            out = model(
                batch.input_ids, batch.position_ids, batch.layout, labels=batch.labels,
                loss_index=loss_index,
            )  # fmt: skip
            loss_sum, count, _ = sdar_loss(out, batch)
            (loss_sum / count).backward()

    elif objective == "ar":

        def step():
            out, loss_fn = ar_forward(model, batch)
            loss_sum, count, _ = loss_fn(out)
            (loss_sum / count).backward()

    else:
        from megatron_sdar.attention.flex import build_block_mask

        block_mask = build_block_mask(batch.layout, "block_causal", compile=True)
        n = args.seq_length

        def step():
            logits = model(
                input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=block_mask
            ).logits  # both halves, as the released code computes them
            ce = torch.nn.functional.cross_entropy(
                logits[:, :n].flatten(0, 1).float(), batch.labels.flatten(), reduction="none"
            ).view_as(batch.labels)
            loss = (ce * batch.masked / batch.mask_prob).sum() / batch.eligible.sum()
            loss.backward()

    def fresh_step():
        model.zero_grad(set_to_none=True)
        step()

    return fresh_step


def profile(step: Callable[[], None]) -> None:
    """Where the time of two steps goes, by CUDA kernel (printed)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))


def step_flops(args, objective: str, batch) -> int:
    from megatron_sdar.training.flops import ModelShape, ar_step_flops, sdar_step_flops

    shape = ModelShape.from_config(transformer_config(args), args.vocab_size)
    b = batch.labels.shape[0]
    if objective == "ar":
        return ar_step_flops(shape, b, args.seq_length)
    if objective == "hf-sdar":  # the output layer runs on both halves
        flops = sdar_step_flops(shape, batch.layout, "block_causal")
        return flops + 3 * b * args.seq_length * shape.output_flops_per_token()
    masked = int(batch.masked.sum()) if args.output_positions == "masked" else None
    return sdar_step_flops(shape, batch.layout, "block_causal", output_tokens=masked)


def run_objective(args, objective: str) -> list[dict]:
    torch.manual_seed(args.seed)
    model = build_model(args, objective)
    rows = []
    for micro_batch in args.micro_batch_sizes:
        generator = torch.Generator(device="cuda").manual_seed(args.seed)
        row = {"objective": objective, "micro_batch": micro_batch, "seq_length": args.seq_length}
        try:
            batch = make_batch(args, micro_batch, generator)
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            step = step_fn(args, objective, model, batch)
            ms = cuda_time(step, args.warmup, args.iters)
            if args.profile and not rows:
                profile(step)
            flops = step_flops(args, objective, batch)
            row.update(
                ms=ms,
                data_tokens_per_s=micro_batch * args.seq_length / (ms / 1e3),
                tflops=flops / (ms / 1e3) / 1e12,
                mfu=flops / (ms / 1e3) / (args.peak_tflops * 1e12),
                peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                wall_s=time.perf_counter() - t0,
            )
        except torch.OutOfMemoryError:
            row["oom"] = True
        model.zero_grad(set_to_none=True)
        batch = step = None
        if hasattr(model, "mask_cache"):  # masks and RoPE tables of this micro-batch size
            model.mask_cache.clear()
        torch.cuda.empty_cache()
        rows.append(row)
        print(format_row(row), flush=True)
        if row.get("oom"):
            break
    del model
    torch.cuda.empty_cache()
    return rows


def format_row(row: dict) -> str:
    head = f"{row['objective']:>10} {row['micro_batch']:>4} {row['seq_length']:>6}"
    if row.get("oom"):
        return f"{head}   out of memory"
    return (
        f"{head} {row['ms']:>9.1f} {row['data_tokens_per_s']:>10.0f} {row['tflops']:>8.1f}"
        f" {100 * row['mfu']:>6.1f} {row['peak_gib']:>8.1f}"
    )


def summary(rows: list[dict]) -> dict:
    ok = [r for r in rows if not r.get("oom")]
    best = {}
    for r in ok:
        if r["data_tokens_per_s"] > best.get(r["objective"], {}).get("data_tokens_per_s", 0):
            best[r["objective"]] = r
    out = {"best": {k: {"micro_batch": v["micro_batch"], "data_tokens_per_s": v["data_tokens_per_s"],
                        "mfu": v["mfu"]} for k, v in best.items()}}  # fmt: skip
    if "sdar" in best and "ar" in best:
        out["T2_sdar_over_ar_best"] = best["sdar"]["data_tokens_per_s"] / best["ar"]["data_tokens_per_s"]
        equal = {}
        for r in ok:
            equal.setdefault(r["micro_batch"], {})[r["objective"]] = r["data_tokens_per_s"]
        out["T2_sdar_over_ar_equal_micro_batch"] = {
            mb: v["sdar"] / v["ar"] for mb, v in equal.items() if "sdar" in v and "ar" in v
        }
    if "sdar" in best and "hf-sdar" in best:
        out["T2b_sdar_over_hf_sdar_best"] = (
            best["sdar"]["data_tokens_per_s"] / best["hf-sdar"]["data_tokens_per_s"]
        )
        at1 = {r["objective"]: r["data_tokens_per_s"] for r in ok if r["micro_batch"] == 1}
        if "sdar" in at1 and "hf-sdar" in at1:
            out["T2b_sdar_over_hf_sdar_micro_batch_1"] = at1["sdar"] / at1["hf-sdar"]
    if "sdar" in best:
        out["T3_sdar_mfu_best"] = best["sdar"]["mfu"]
    if "sdar-split" in best:
        out["T3_sdar_split_mfu_best"] = best["sdar-split"]["mfu"]
        if "ar" in best:
            out["T2_sdar_split_over_ar_best"] = (
                best["sdar-split"]["data_tokens_per_s"] / best["ar"]["data_tokens_per_s"]
            )
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("train_step.py needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.seq_length % args.block_size:
        print(
            f"--seq-length {args.seq_length} is not a multiple of --block-size {args.block_size}",
            file=sys.stderr,
        )
        return 2
    warnings.filterwarnings("ignore")
    if args.kernel_options_from is not None:
        sweep = json.loads(args.kernel_options_from.read_text())["sweep"]
        args.kernel_options = sweep["candidates"][sweep["best"]]["options"] or None
    init_world()
    print(
        f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  recompute: {args.recompute}  "
        f"fusions: {not args.no_fusions}  flex kernel options: {args.kernel_options}"
    )
    columns = (
        ("mbs", 4),
        ("L", 6),
        ("ms/step", 9),
        ("tokens/s", 10),
        ("TFLOP/s", 8),
        ("MFU%", 6),
        ("peak GiB", 8),
    )
    print(f"{'objective':>10} " + " ".join(f"{name:>{width}}" for name, width in columns))
    rows = []
    for objective in args.objectives:
        try:
            rows += run_objective(args, objective)
        except Exception as exc:  # a baseline that cannot run here must not hide the others
            rows.append({"objective": objective, "error": f"{type(exc).__name__}: {exc}"[:2000]})
            print(f"{objective:>10} failed: {rows[-1]['error']}", flush=True)
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "device": torch.cuda.get_device_name(),
              "rows": rows, "summary": summary([r for r in rows if "error" not in r])}  # fmt: skip
    print(json.dumps(result["summary"], indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
