#!/usr/bin/env python3
"""Peak memory of HF -> Megatron conversion against model size (target T5), on CPU.

    python benchmarks/conversion_memory.py --layers 40 --hidden 1024 --ffn 2816

Builds a random many-layer Qwen3-shaped HF checkpoint (bf16, sharded safetensors) in a scratch
directory, then runs tools/convert_hf_to_mcore.py and tools/convert_mcore_to_hf.py in fresh
processes and reports each one's peak RSS, the RSS of a process that only imports the same
libraries, the model's size, and the size of its largest parameter.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child_peak_mb(code: str) -> float:
    """Peak RSS (MB) of a fresh Python process running ``code`` (reported by the process itself)."""
    code += "; import resource; print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=ROOT, env=env, capture_output=True, text=True
    )
    line = next(x for x in out.stdout.splitlines() if x.startswith("PEAK_RSS_KB"))
    return int(line.split()[1]) / 1024


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=40)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import torch
    import transformers

    work = Path(tempfile.mkdtemp(prefix="convmem"))
    cfg = transformers.Qwen3Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 128, num_key_value_heads=max(1, args.hidden // 512), head_dim=128,
        tie_word_embeddings=False,
    )  # fmt: skip
    with torch.device("meta"):
        model = transformers.Qwen3ForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for prm in model.parameters():
            prm.normal_(0, 0.02)
    model.save_pretrained(work / "hf", max_shard_size="200MB")
    sizes = {n: p.numel() * 2 for n, p in model.named_parameters()}
    del model
    model_mb = sum(sizes.values()) / 2**20
    largest_mb = max(sizes.values()) / 2**20

    imports = "import torch, megatron.core, transformers, safetensors, megatron_sdar.model"
    base = child_peak_mb(imports)
    to_mcore = child_peak_mb(
        "from tools import convert_hf_to_mcore as c; "
        f"c.main(['--hf-dir', '{work / 'hf'}', '--save', '{work / 'ckpt'}', '--dtype', 'bf16'])"
    )
    to_hf = child_peak_mb(
        "from tools import convert_mcore_to_hf as c; "
        f"c.main(['--load', '{work / 'ckpt'}', '--save', '{work / 'back'}', '--format', 'ar', "
        "'--dtype', 'bf16', '--max-shard-size-mb', '100'])"
    )
    result = {
        "model_mb": round(model_mb),
        "largest_parameter_mb": round(largest_mb),
        "import_only_peak_rss_mb": round(base),
        "hf_to_mcore_peak_rss_mb": round(to_mcore),
        "mcore_to_hf_peak_rss_mb": round(to_hf),
    }
    print(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    print(f"HF -> Megatron used {to_mcore - base:.0f} MB above imports for a {model_mb:.0f} MB model")
    print(f"Megatron -> HF used {to_hf - base:.0f} MB above imports (100 MB output shards)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
