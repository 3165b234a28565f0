#!/usr/bin/env python3
"""SDAR continued pretraining from scratch on one GPU, no downloads: corpus -> tokenizer -> data -> CPT.

    python examples/cpt_from_scratch.py                 # ~300 steps of a small Qwen3-shaped model
    python examples/cpt_from_scratch.py --dry-run       # prepare data, print the training command
    python examples/cpt_from_scratch.py --num-experts 8 --moe-router-topk 2   # Qwen3-MoE-shaped

1. builds a corpus from the documentation text every Python ships (``pydoc_data``);
2. trains a byte-level BPE tokenizer on it (with ``<|endoftext|>`` and a ``<|mask|>`` token) and
   saves it as a HF tokenizer directory;
3. tokenises the corpus into Megatron's indexed format with ``tools/preprocess_data.py``;
4. runs ``pretrain_sdar.py`` (SDAR CPT, block size 4) through ``torchrun`` on one GPU, then prints
   the diffusion loss at the start and the end and where the checkpoint went.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SPECIALS = ["<|endoftext|>", "<|mask|>"]


def build_corpus(path: str) -> int:
    """One JSONL document per pydoc topic, split into paragraphs-sized chunks."""
    import pydoc_data.topics as topics

    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for name, text in sorted(topics.topics.items()):
            for chunk in re.split(r"\n\s*\n(?=\S)", text):
                if len(chunk.strip()) > 40:
                    f.write(json.dumps({"text": chunk.strip(), "topic": name}) + "\n")
                    n += 1
    return n


def build_tokenizer(corpus: str, out_dir: str, vocab_size: int) -> dict:
    """A byte-level BPE tokenizer saved as a HF tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def texts():
        with open(corpus, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(out_dir)
    return {
        "eod": fast.convert_tokens_to_ids("<|endoftext|>"),
        "mask": fast.convert_tokens_to_ids("<|mask|>"),
    }


def training_command(
    args: argparse.Namespace, tokenizer_dir: str, data_prefix: str, mask_id: int
) -> list[str]:
    """The ``torchrun pretrain_sdar.py`` command line for a small Qwen3-shaped model."""
    try:
        import transformer_engine  # noqa: F401

        impl = "transformer_engine"
    except ImportError:
        impl = "local"
    try:
        import apex  # noqa: F401

        local = []
    except ImportError:  # torch norms and plain weight-gradient GEMMs stand in for Apex's kernels
        local = ["--no-persist-layer-norm", "--no-gradient-accumulation-fusion"] if impl == "local" else []
    model = [
        "--num-layers",
        "6",
        "--hidden-size",
        "384",
        "--num-attention-heads",
        "6",
        "--group-query-attention",
        "--num-query-groups",
        "2",
        "--kv-channels",
        "64",
        "--ffn-hidden-size",
        "1024",
        "--normalization",
        "RMSNorm",
        "--norm-epsilon",
        "1e-6",
        "--qk-layernorm",
        "--swiglu",
        "--disable-bias-linear",
        "--untie-embeddings-and-output-weights",
        "--position-embedding-type",
        "rope",
        "--rotary-base",
        "1000000",
        "--no-rope-fusion",
        "--attention-dropout",
        "0",
        "--hidden-dropout",
        "0",
        "--init-method-std",
        "0.02",
        "--seq-length",
        str(args.seq_length),
        "--max-position-embeddings",
        str(args.seq_length),
    ]
    training = [
        "--micro-batch-size",
        str(args.micro_batch_size),
        "--global-batch-size",
        str(args.global_batch_size),
        "--train-iters",
        str(args.steps),
        "--lr",
        "1e-3",
        "--min-lr",
        "1e-4",
        "--lr-decay-style",
        "cosine",
        "--lr-warmup-iters",
        str(max(1, args.steps // 20)),
        "--weight-decay",
        "0.1",
        "--clip-grad",
        "1.0",
        "--adam-beta2",
        "0.95",
        "--bf16",
        "--use-distributed-optimizer",
        "--calculate-per-token-loss",
        "--transformer-impl",
        impl,
        "--seed",
        "1234",
        *local,
    ]
    data = [
        "--tokenizer-type",
        "HuggingFaceTokenizer",
        "--tokenizer-model",
        tokenizer_dir,
        "--data-path",
        data_prefix,
        "--split",
        "98,2,0",
        "--eval-interval",
        str(max(1, args.steps // 3)),
        "--eval-iters",
        "4",
    ]
    io = [
        "--save",
        os.path.join(args.workdir, "checkpoints"),
        "--save-interval",
        str(args.steps),
        "--log-interval",
        "10",
        "--log-throughput",
        "--tensorboard-dir",
        os.path.join(args.workdir, "tensorboard"),
    ]
    sdar = ["--sdar-mask-token-id", str(mask_id), "--sdar-block-size", str(args.block_size)]
    moe = []
    if args.num_experts:  # Qwen3-MoE shape: routed experts only, softmax then top-k, aux loss
        moe = [
            "--num-experts", str(args.num_experts), "--moe-router-topk", str(args.moe_router_topk),
            "--moe-ffn-hidden-size", "256", "--moe-router-load-balancing-type", "aux_loss",
            "--moe-aux-loss-coeff", "1e-3", "--moe-token-dispatcher-type", "alltoall",
        ]  # fmt: skip
        if impl == "transformer_engine":
            moe.append("--moe-grouped-gemm")
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--standalone",
        os.path.join(ROOT, "pretrain_sdar.py"), *model, *moe, *training, *data, *io, *sdar,
    ]  # fmt: skip


def parse_losses(log: str) -> list[float]:
    return [float(m) for m in re.findall(r"lm loss: ([0-9.Ee+-]+)", log)]


def data_tokens_per_second(log: str, seq_length: int, global_batch_size: int) -> float | None:
    """Clean (data) tokens per second from Megatron's per-iteration times: the median over the logged
    intervals after the first (which compiles), so an interval holding a validation pass or a
    recompilation for its shapes does not drag the figure down."""
    times = [float(m) for m in re.findall(r"elapsed time per iteration \(ms\): ([0-9.]+)", log)]
    if len(times) < 2:
        return None
    return global_batch_size * seq_length / (statistics.median(times[1:]) / 1000.0)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "cpt-from-scratch"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--block-size", type=int, default=4)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--global-batch-size", type=int, default=32)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--num-experts", type=int, default=0, help="MoE: routed experts per layer (0: dense)")
    p.add_argument("--moe-router-topk", type=int, default=2)
    p.add_argument("--dry-run", action="store_true", help="prepare data and print the command only")
    args = p.parse_args(argv)
    if args.num_experts and not 1 <= args.moe_router_topk <= args.num_experts:
        p.error(
            f"--moe-router-topk {args.moe_router_topk} must be between 1 and --num-experts {args.num_experts}"
        )
    os.makedirs(args.workdir, exist_ok=True)

    corpus = os.path.join(args.workdir, "corpus.jsonl")
    docs = build_corpus(corpus)
    print(f"[1/4] corpus: {docs} documents -> {corpus}")
    tokenizer_dir = os.path.join(args.workdir, "tokenizer")
    ids = build_tokenizer(corpus, tokenizer_dir, args.vocab_size)
    print(f"[2/4] tokenizer: {tokenizer_dir} (end of document {ids['eod']}, mask {ids['mask']})")
    from tools import preprocess_data

    prefix = os.path.join(args.workdir, "data", "corpus")
    summary = preprocess_data.main(
        ["--input", corpus, "--tokenizer", tokenizer_dir, "--output-prefix", prefix, "--overwrite", "--quiet"]
    )
    data_prefix = summary["outputs"][0]
    print(f"[3/4] data: {summary['tokens']['text']} tokens -> {data_prefix}")
    cmd = training_command(args, tokenizer_dir, data_prefix, ids["mask"])
    result = {"command": cmd, "data_prefix": data_prefix, "tokenizer": tokenizer_dir, "mask_id": ids["mask"]}
    if args.dry_run:
        print("[4/4] training command:\n" + shlex.join(cmd))
        return result
    print(f"[4/4] training {args.steps} steps:\n{shlex.join(cmd)}", flush=True)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log_lines = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        for line in proc.stdout:
            log_lines.append(line)
            if "iteration" in line or "error" in line.lower() or "validation" in line:
                print(line, end="", flush=True)
    if proc.returncode != 0:
        print("".join(log_lines[-40:]), file=sys.stderr)
        raise SystemExit(f"training failed with exit code {proc.returncode}")
    log = "".join(log_lines)
    losses = parse_losses(log)
    if losses:
        print(f"diffusion loss: {losses[0]:.3f} (first logged) -> {losses[-1]:.3f} (last logged)")
    throughput = data_tokens_per_second(log, args.seq_length, args.global_batch_size)
    if throughput is not None:
        print(f"throughput: {throughput:,.0f} data tokens/s (each processed twice: x_t and x_0)")
    result["data_tokens_per_second"] = throughput
    memory = re.findall(r"max allocated: ([0-9.]+)", log)
    if memory:
        result["max_allocated_mb"] = float(memory[-1])
        print(f"peak memory: {float(memory[-1]):,.0f} MB allocated (Megatron's report, with optimizer state)")
    print(f"checkpoint: {os.path.join(args.workdir, 'checkpoints')}")
    result["losses"] = losses
    return result


if __name__ == "__main__":
    main()
