#!/usr/bin/env python3
"""Generate with an SDAR model (block diffusion) or a Qwen3/Llama model (AR), on CPU or GPU, from an
HF folder or directly from a Megatron checkpoint.

    python tools/generate.py --hf-dir hf/qwen3-sdar --prompt "Explain RoPE." --chat
    torchrun --nproc-per-node 2 tools/generate.py --load runs/qwen3-sdar-sft --prompt "Explain RoPE."
    python tools/generate.py --hf-dir hf/qwen3-sdar --prompts-file prompts.jsonl --strategy \\
        low_confidence_dynamic --tau 0.9 --max-new-tokens 256 --json-out out.json
    python tools/generate.py --hf-dir hf/qwen3 --mode ar --prompt "Hello"

Block size and mask token come from the export's config (``block_size``, ``mask_token_id``) or the
checkpoint's recorded architecture unless given; both back ends decode the same tokens. Prints each
completion and the accounting: tokens per forward (TPF), forwards per block (block diffusion) and
tokens per second, with the strategy's own settings (``--tau`` only for ``low_confidence_dynamic``,
``--steps`` for the static ones, ``--entropy-bound`` for ``entropy_bounded``). Under ``torchrun``
every rank decodes and rank 0 prints and writes ``--json-out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sdar import compat  # noqa: E402

compat.ignore_known_warnings()  # the megatron-core / torch notices named there, nothing else

from megatron_sdar.conversion.hf import DTYPES  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from megatron_sdar.inference.loading import add_model_source_args
    from megatron_sdar.inference.strategies import STRATEGIES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_source_args(p)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="text file (one prompt per line) or JSONL with a 'prompt' field")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
    p.add_argument("--mode", choices=("sdar", "ar"), default="sdar")
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--mask-token-id", type=int, default=None)
    p.add_argument("--strategy", choices=STRATEGIES, default="low_confidence_dynamic")
    p.add_argument(
        "--steps", type=int, default=None,
        help="forwards per block (sequential, low_confidence_static; default: block size)",
    )  # fmt: skip
    p.add_argument("--tau", type=float, default=0.9, help="confidence threshold (low_confidence_dynamic)")
    p.add_argument("--min-per-step", type=int, default=1, help="(low_confidence_dynamic)")
    p.add_argument("--entropy-bound", type=float, default=0.5, help="(entropy_bounded)")
    p.add_argument(
        "--clean-attention",
        choices=("block_causal", "causal"),
        default=None,
        help="how committed blocks attend to themselves (default: what the model records, else block_causal)",
    )
    p.add_argument("--no-fold-commit", action="store_true", help="write each block's cache with its own pass")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--stop", action="append", default=None, help="stop token (string or id; default: eos)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if _cuda() else "fp32")
    p.add_argument("--json-out", help="write completions and accounting here")
    return p


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                if line.lstrip().startswith("{"):
                    try:
                        prompts.append(json.loads(line)["prompt"])
                    except (json.JSONDecodeError, KeyError) as err:
                        raise SystemExit(
                            f"error: {args.prompts_file}:{n}: expected a JSON object with 'prompt' ({err})"
                        ) from None
                else:
                    prompts.append(line)
    if not prompts:
        raise SystemExit("error: no prompts: pass --prompt or --prompts-file")
    return prompts


def stop_ids(tokenizer, values: list[str] | None) -> tuple[int, ...]:
    if not values:
        eos = tokenizer.eos_token_id
        return tuple(eos if isinstance(eos, list) else [eos]) if eos is not None else ()
    ids = []
    for v in values:
        if v.isdigit():
            ids.append(int(v))
        else:
            token_id = tokenizer.convert_tokens_to_ids(v)
            if token_id is None or token_id == tokenizer.unk_token_id:
                raise SystemExit(f"error: stop token {v!r} is not in the tokenizer")
            ids.append(token_id)
    return tuple(ids)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    import torch

    from megatron_sdar.data.tokenizer import load_hf_tokenizer
    from megatron_sdar.inference import SamplingConfig, StrategyConfig, generate_ar, generate_block_diffusion
    from megatron_sdar.inference.loading import load_backend

    dtype = getattr(torch, DTYPES[args.dtype])
    try:
        sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
        strategy = StrategyConfig(args.strategy, args.steps, args.tau, args.min_per_step, args.entropy_bound)
        backend, sdar, tokenizer_dir = load_backend(
            args.hf_dir, args.load, args.iteration, args.device, dtype
        )
        tokenizer_dir = args.tokenizer or tokenizer_dir
        if tokenizer_dir is None:
            raise ValueError(f"no tokenizer found with {args.load}; pass --tokenizer")
        tokenizer = load_hf_tokenizer(tokenizer_dir)
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    texts = read_prompts(args)
    if args.chat:
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True
            )
            for t in texts
        ]
    prompts = [tokenizer(t, add_special_tokens=not args.chat).input_ids for t in texts]
    stops = stop_ids(tokenizer, args.stop)
    if args.mode == "ar":
        result = generate_ar(
            backend, prompts, max_new_tokens=args.max_new_tokens, sampling=sampling, stop_token_ids=stops,
            seed=args.seed, mask_token_id=sdar.get("mask_token_id"),
        )  # fmt: skip
    else:
        block = args.block_size or sdar.get("block_size")
        mask = args.mask_token_id if args.mask_token_id is not None else sdar.get("mask_token_id")
        if block is None or mask is None:
            raise SystemExit(
                f"error: {args.hf_dir or args.load} records no SDAR block size / mask token id; "
                "pass --block-size and --mask-token-id, or --mode ar"
            )
        try:
            result = generate_block_diffusion(
                backend, prompts, block_size=block, mask_token_id=mask, max_new_tokens=args.max_new_tokens,
                strategy=strategy, sampling=sampling, stop_token_ids=stops, seed=args.seed,
                fold_commit=not args.no_fold_commit,
                clean_attention=args.clean_attention or sdar.get("clean_attention") or "block_causal",
            )  # fmt: skip
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
    completions = [tokenizer.decode(t, skip_special_tokens=True) for t in result.tokens]
    summary = {"mode": args.mode, "backend": "megatron" if args.load else "hf", **result.summary()}
    if args.mode == "sdar":  # the block size and the knobs this strategy reads, nothing else
        summary.update(block_size=block, **strategy.settings(block))
    out = {"summary": summary, "completions": completions, "tokens": result.tokens}
    if int(os.environ.get("RANK", "0")) != 0:  # tensor-parallel ranks all decode; one reports
        return out
    for text, completion in zip(texts, completions):
        print(f"### prompt\n{text}\n### completion\n{completion}\n")
    print(json.dumps(summary))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
