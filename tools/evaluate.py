#!/usr/bin/env python3
"""Evaluate an SDAR (or AR) model: math word-problem accuracy with decoding speed, and held-out text.

    python tools/evaluate.py --hf-dir hf/qwen3-sdar --math gsm.jsonl --chat --taus 0.8 0.9 0.95 1.0 \\
        --block-sizes 4 8 --text held_out.jsonl --json-out eval.json
    python tools/evaluate.py --hf-dir hf/qwen3 --mode ar --math gsm.jsonl --chat

``--math``: JSONL with ``question`` and ``answer`` (GSM8K style, ``... #### 42``); every decoding
setting (block size x tau; tau only for ``low_confidence_dynamic``) reports accuracy, tokens per
forward (TPF) and tokens/s. ``--text``: held-out documents, each closed by the end-of-document
token, packed into ``--seq-length`` windows; all of the text is scored (the last window is shorter)
up to ``--text-windows`` windows. A JSONL file (``.jsonl``/``.json``, or a first line starting with
``{``) has one document per line (its ``text``); plain text is split into documents as
``tools/preprocess_data.py`` splits it: one per paragraph (blank-line separated) by default,
``--text-unit line`` or ``file`` otherwise. SDAR models report the diffusion loss bound (Eq. 7,
fixed noise seed), AR models the next-token NLL; ``--text-metrics diffusion ar`` reports both (an
SDAR model trained with ``--sdar-ar-loss-weight``: the NLL under a causal mask, which is how its
clean half was trained; pass ``--clean-attention causal`` too, so that the bound and block decoding
read clean keys computed as in training). Prints a table and the text summary (documents, tokens,
windows) and writes JSON; under ``torchrun`` every rank computes and rank 0 reports.
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

TEXT_METRICS = ("diffusion", "ar")


def build_parser() -> argparse.ArgumentParser:
    from megatron_sdar.inference.loading import add_model_source_args
    from megatron_sdar.inference.strategies import STRATEGIES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_source_args(p)
    p.add_argument("--mode", choices=("sdar", "ar"), default="sdar")
    p.add_argument("--math", help="JSONL math problems (question, answer with '#### N')")
    p.add_argument("--limit", type=int, default=None, help="first N problems")
    p.add_argument("--chat", action="store_true", help="ask through the chat template")
    p.add_argument(
        "--taus", type=float, nargs="+", default=None,
        help="confidence thresholds, one setting each (low_confidence_dynamic only; default: 0.9)",
    )  # fmt: skip
    p.add_argument("--block-sizes", type=int, nargs="+", default=None, help="default: the model's")
    p.add_argument("--strategy", choices=STRATEGIES, default="low_confidence_dynamic")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--text", help="held-out documents: JSONL (one per line, 'text') or plain text split by --text-unit"
    )
    p.add_argument(
        "--text-unit", choices=("paragraph", "line", "file"), default="paragraph",
        help="documents of a plain-text --text: blank-line separated paragraphs (default), lines, or the "
        "whole file",
    )  # fmt: skip
    p.add_argument("--seq-length", type=int, default=512, help="--text window length (the last is shorter)")
    p.add_argument("--text-windows", type=int, default=16, help="score at most this many --text windows")
    p.add_argument("--noise-samples", type=int, default=2, help="noise draws per window (diffusion bound)")
    p.add_argument(
        "--text-metrics", choices=TEXT_METRICS, nargs="+", default=None,
        help="--text scores: diffusion (the Eq. 7 bound; needs the model's block size and mask token) "
        "and/or ar (next-token NLL, causal mask); default: diffusion for --mode sdar, ar for --mode ar",
    )  # fmt: skip
    p.add_argument(
        "--clean-attention", choices=("block_causal", "causal"), default="block_causal",
        help="the clean half's attention in the diffusion bound and block decoding: causal for models "
        "trained with --sdar-clean-attention causal (as --sdar-ar-loss-weight requires)",
    )  # fmt: skip
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


def text_windows(
    path: str, tokenizer, seq_length: int, limit: int, eod: int, unit: str = "paragraph"
) -> tuple[list, dict]:
    """The documents of ``path``, each followed by ``eod``, packed into windows of ``seq_length``
    tokens (the last holds what is left, so nothing read is dropped), at most ``limit`` windows.

    Returns the windows (1-D tensors) and what was read: the file's format and document unit, the
    documents and tokens scored, and whether the ``limit`` stopped the reading early.
    """
    import torch

    from tools.preprocess_data import read_records

    fmt = "jsonl" if _is_jsonl(path) else "text"
    cap = seq_length * limit
    tokens: list[int] = []
    documents, capped = 0, False
    for record in read_records(path, fmt, ["text"], unit):
        if record.error:
            raise SystemExit(f"error: {path}:{record.line}: {record.error}")
        tokens += tokenizer(record.texts["text"], add_special_tokens=False).input_ids + [eod]
        documents += 1
        if len(tokens) > cap:
            capped = True
            break
    tokens = tokens[:cap]
    if len(tokens) < 2:
        raise SystemExit(f"error: {path} holds no text to score")
    windows = [torch.tensor(tokens[i : i + seq_length]) for i in range(0, len(tokens), seq_length)]
    info = {
        "format": fmt,
        "document_unit": "line" if fmt == "jsonl" else unit,
        "documents": documents,
        "tokens": len(tokens),
        "windows": len(windows),
        "seq_length": seq_length,
        "last_window_tokens": len(windows[-1]),
        "stopped_at_text_windows": capped,
    }
    return windows, info


def _is_jsonl(path: str) -> bool:
    if path.endswith((".jsonl", ".json")):
        return True
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                return line.lstrip().startswith("{")
    return False


def describe_text(info: dict, limit: int) -> str:
    """One line: how the held-out text was split and how much of it was scored."""
    unit = {
        "line": "one per line",
        "file": "the whole file",
        "paragraph": "one per paragraph, split at blank lines",
    }[info["document_unit"]]
    source = f"JSONL, {unit}" if info["format"] == "jsonl" else f"plain text, {unit}; see --text-unit"
    line = f"{info['documents']} documents ({source}) -> {info['tokens']:,} tokens"
    line += f" in {info['windows']} window(s) of {info['seq_length']}"
    if info["last_window_tokens"] < info["seq_length"]:
        line += f" (the last {info['last_window_tokens']})"
    if info["stopped_at_text_windows"]:
        line += f"; stopped at --text-windows {limit}, the rest of the file was not read"
    return line


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    import torch

    from megatron_sdar.config import SDARConfig
    from megatron_sdar.data.tokenizer import load_hf_tokenizer
    from megatron_sdar.evaluation import diffusion_bound, extract_answer, next_token_nll, read_math_problems
    from megatron_sdar.inference import StrategyConfig, generate_ar, generate_block_diffusion
    from megatron_sdar.inference.loading import load_backend

    if not args.math and not args.text:
        raise SystemExit("error: nothing to evaluate: pass --math and/or --text")
    dynamic = args.strategy == "low_confidence_dynamic"
    if args.taus and not dynamic and args.mode == "sdar":
        raise SystemExit(
            f"error: --taus applies to --strategy low_confidence_dynamic only, not {args.strategy}"
        )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, DTYPES[args.dtype or ("bf16" if device.startswith("cuda") else "fp32")])
    try:
        backend, sdar, tokenizer_dir = load_backend(args.hf_dir, args.load, args.iteration, device, dtype)
        tokenizer = load_hf_tokenizer(args.tokenizer or tokenizer_dir)
        problems = read_math_problems(args.math, args.limit) if args.math else []
    except (OSError, ValueError, TypeError) as err:
        raise SystemExit(f"error: {err}") from None
    metrics = args.text_metrics or (["ar"] if args.mode == "ar" else ["diffusion"])
    diffusion_metric = bool(args.text) and "diffusion" in metrics
    if (args.mode == "sdar" or diffusion_metric) and (
        sdar.get("block_size") is None or sdar.get("mask_token_id") is None
    ):
        raise SystemExit(
            "error: the model records no SDAR block size / mask token id; use --mode ar "
            "(and --text-metrics ar)"
        )
    eos = tokenizer.eos_token_id
    stops = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    rows, report = [], {"model": args.hf_dir or args.load, "mode": args.mode}

    if problems:
        prompts = [question_prompt(tokenizer, p.question, args.chat) for p in problems]
        taus = (args.taus or [0.9]) if dynamic else [None]
        settings = [("ar", None, None)] if args.mode == "ar" else [
            ("sdar", b, tau) for b in (args.block_sizes or [sdar["block_size"]]) for tau in taus
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
                    strategy = StrategyConfig(args.strategy, tau=0.9 if tau is None else tau)
                    result = generate_block_diffusion(
                        backend, chunk, block_size=block, mask_token_id=sdar["mask_token_id"],
                        max_new_tokens=args.max_new_tokens, strategy=strategy,
                        stop_token_ids=stops, seed=args.seed, clean_attention=args.clean_attention,
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
            label = "ar" if kind == "ar" else f"B={block} " + (f"tau={tau}" if dynamic else args.strategy)
            rows.append({
                "setting": label,
                "accuracy": correct / len(problems),
                "tokens_per_forward": generated / max(1, row_forwards),
                "tokens_per_second": generated / seconds if seconds > 0 else 0.0,
                "problems": len(problems),
                "samples": samples,
            })  # fmt: skip
        report["math"] = rows

    if args.text:
        eod = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        windows, report["text_input"] = text_windows(
            args.text, tokenizer, args.seq_length, args.text_windows, eod, args.text_unit
        )
        scores = {}
        if "diffusion" in metrics:
            config = SDARConfig(
                block_size=sdar["block_size"], mask_token_id=sdar["mask_token_id"],
                clean_attention=args.clean_attention,
            )  # fmt: skip
            scores.update(diffusion_bound(backend, windows, eod, config, args.seed, args.noise_samples))
        if "ar" in metrics:
            nll = next_token_nll(backend, windows, eod)
            if scores:  # beside the bound: its target count under its own name
                nll["nll_tokens"] = nll.pop("tokens")
            scores.update(nll)
        report["text"] = scores

    if int(os.environ.get("RANK", "0")) != 0:  # tensor-parallel ranks all compute; rank 0 reports
        return report
    if rows:
        print(f"{'setting':<22}{'accuracy':>10}{'TPF':>8}{'tokens/s':>11}")
        for r in rows:
            print(
                f"{r['setting']:<22}{r['accuracy']:>10.3f}{r['tokens_per_forward']:>8.2f}{r['tokens_per_second']:>11.1f}"
            )
    if args.text:
        print("held-out text: " + describe_text(report["text_input"], args.text_windows))
        print("  " + ", ".join(f"{k} {v:.4f}" for k, v in report["text"].items()))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
