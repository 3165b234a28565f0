#!/usr/bin/env python3
"""Evaluate an SDAR (or AR) model: math word-problem accuracy with decoding speed, and held-out text.

    python tools/evaluate.py --hf-dir hf/qwen3-sdar --math gsm.jsonl --chat --taus 0.8 0.9 0.95 1.0 \\
        --block-sizes 4 8 --text held_out.jsonl --json-out eval.json
    python tools/evaluate.py --hf-dir hf/qwen3 --mode ar --math gsm.jsonl --chat

``--math``: JSONL with ``question`` and ``answer`` (GSM8K style, ``... #### 42``); every decoding
setting (block size x tau) reports accuracy, tokens per forward (TPF) and tokens/s. ``--text``:
text or JSONL (``text``) documents packed into ``--seq-length`` windows; SDAR models report the
diffusion loss bound (Eq. 7, fixed noise seed), AR models the next-token NLL. Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sdar import compat  # noqa: E402

compat.ignore_known_warnings()  # the megatron-core / torch notices named there, nothing else

from megatron_sdar.conversion.hf import DTYPES  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from megatron_sdar.inference.loading import add_model_source_args
    from megatron_sdar.inference.strategies import STRATEGIES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_source_args(p)
    p.add_argument("--mode", choices=("sdar", "ar"), default="sdar")
    p.add_argument("--math", help="JSONL math problems (question, answer with '#### N')")
    p.add_argument("--limit", type=int, default=None, help="first N problems")
    p.add_argument("--chat", action="store_true", help="ask through the chat template")
    p.add_argument("--taus", type=float, nargs="+", default=[0.9])
    p.add_argument("--block-sizes", type=int, nargs="+", default=None, help="default: the model's")
    p.add_argument("--strategy", choices=STRATEGIES, default="low_confidence_dynamic")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--text", help="held-out text or JSONL ('text') documents")
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--text-windows", type=int, default=16)
    p.add_argument("--noise-samples", type=int, default=2, help="noise draws per window (diffusion bound)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    p.add_argument("--json-out")
    return p


def question_prompt(tokenizer, question: str, chat: bool) -> list[int]:
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer(f"Question: {question}\nAnswer:").input_ids


def text_windows(path: str, tokenizer, seq_length: int, limit: int, eod: int):
    import torch

    tokens: list[int] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    line = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError) as err:
                    raise SystemExit(f"error: {path}:{n}: expected JSON with 'text' ({err})") from None
            tokens += tokenizer(line, add_special_tokens=False).input_ids + [eod]
            if len(tokens) >= seq_length * limit:
                break
    count = min(limit, len(tokens) // seq_length)
    if count == 0:
        raise SystemExit(f"error: {path} has fewer than {seq_length} tokens; lower --seq-length")
    return torch.tensor(tokens[: count * seq_length]).view(count, seq_length)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    from megatron_sdar.config import SDARConfig
    from megatron_sdar.evaluation import diffusion_bound, extract_answer, next_token_nll, read_math_problems
    from megatron_sdar.inference import StrategyConfig, generate_ar, generate_block_diffusion
    from megatron_sdar.inference.loading import load_backend

    if not args.math and not args.text:
        raise SystemExit("error: nothing to evaluate: pass --math and/or --text")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, DTYPES[args.dtype or ("bf16" if device.startswith("cuda") else "fp32")])
    try:
        backend, sdar, tokenizer_dir = load_backend(args.hf_dir, args.load, args.iteration, device, dtype)
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or tokenizer_dir, local_files_only=True)
        problems = read_math_problems(args.math, args.limit) if args.math else []
    except (OSError, ValueError, TypeError) as err:
        raise SystemExit(f"error: {err}") from None
    if args.mode == "sdar" and (sdar.get("block_size") is None or sdar.get("mask_token_id") is None):
        raise SystemExit("error: the model records no SDAR block size / mask token id; use --mode ar")
    eos = tokenizer.eos_token_id
    stops = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    rows, report = [], {"model": args.hf_dir or args.load, "mode": args.mode}

    if problems:
        prompts = [question_prompt(tokenizer, p.question, args.chat) for p in problems]
        settings = [("ar", None, None)] if args.mode == "ar" else [
            ("sdar", b, tau) for b in (args.block_sizes or [sdar["block_size"]]) for tau in args.taus
        ]  # fmt: skip
        for kind, block, tau in settings:
            correct = generated = row_forwards = 0
            start = time.perf_counter()
            samples = []
            for i in range(0, len(prompts), args.batch_size):
                chunk = prompts[i : i + args.batch_size]
                if kind == "ar":
                    result = generate_ar(
                        backend, chunk, max_new_tokens=args.max_new_tokens, stop_token_ids=stops,
                        seed=args.seed, mask_token_id=sdar.get("mask_token_id"),
                    )  # fmt: skip
                else:
                    result = generate_block_diffusion(
                        backend, chunk, block_size=block, mask_token_id=sdar["mask_token_id"],
                        max_new_tokens=args.max_new_tokens, strategy=StrategyConfig(args.strategy, tau=tau),
                        stop_token_ids=stops, seed=args.seed,
                    )  # fmt: skip
                generated += result.generated
                row_forwards += sum(result.row_forwards)
                for j, tokens in enumerate(result.tokens):
                    text = tokenizer.decode(tokens, skip_special_tokens=True)
                    problem = problems[i + j]
                    ok = extract_answer(text) == problem.answer
                    correct += ok
                    if len(samples) < 3:
                        samples.append({"question": problem.question, "completion": text, "correct": ok})
            seconds = time.perf_counter() - start
            rows.append({
                "setting": "ar" if kind == "ar" else f"B={block} tau={tau}",
                "accuracy": correct / len(problems),
                "tokens_per_forward": generated / max(1, row_forwards),
                "tokens_per_second": generated / seconds if seconds > 0 else 0.0,
                "problems": len(problems),
                "samples": samples,
            })  # fmt: skip
        report["math"] = rows

    if args.text:
        eod = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        windows = text_windows(args.text, tokenizer, args.seq_length, args.text_windows, eod)
        if args.mode == "ar":
            report["text"] = next_token_nll(backend, windows, eod)
        else:
            config = SDARConfig(block_size=sdar["block_size"], mask_token_id=sdar["mask_token_id"])
            report["text"] = diffusion_bound(backend, windows, eod, config, args.seed, args.noise_samples)

    if rows:
        print(f"{'setting':<22}{'accuracy':>10}{'TPF':>8}{'tokens/s':>11}")
        for r in rows:
            print(
                f"{r['setting']:<22}{r['accuracy']:>10.3f}{r['tokens_per_forward']:>8.2f}{r['tokens_per_second']:>11.1f}"
            )
    if args.text:
        print("held-out text: " + ", ".join(f"{k} {v:.4f}" for k, v in report["text"].items()))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
