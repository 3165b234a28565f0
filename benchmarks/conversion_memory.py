#!/usr/bin/env python3
"""Peak memory of HF -> Megatron conversion against model size (target T5), on CPU.

    python benchmarks/conversion_memory.py --layers 40 --hidden 1024 --ffn 2816
    python benchmarks/conversion_memory.py --layers 3 --dtype fp32 --single-file   # ~400 MB, one file

Builds a random many-layer Qwen3-shaped HF checkpoint (sharded safetensors, or one
``model.safetensors`` with ``--single-file``) in a scratch directory, then runs
tools/convert_hf_to_mcore.py and tools/convert_mcore_to_hf.py in fresh processes and reports, for
each and for a process that only imports the same libraries: the peak RSS, and the peaks of its two
parts, anonymous memory (``RssAnon``: what the process allocated) and file-backed memory
(``RssFile``: pages of files it maps), sampled from ``/proc/self/status`` every few milliseconds.

The importer reads the safetensors files through a memory map (safetensors hands out tensors that
are views of it, without copying), and every page it has read stays counted in its RSS until the
file is closed at exit, so its peak RSS grows by about the size of the files. Those pages are the
page cache's: clean, shared with any other reader of the file, and dropped by the kernel under
memory pressure without writing anything. What the conversion itself holds is its anonymous
memory, which stays small. Measured (``--layers 3 --dtype fp32 --single-file``: one 379 MB file,
largest parameter 125 MB): imports alone peak at 683 MB RSS (412 MB anonymous, 271 MB file-backed,
the libraries' own code); HF -> Megatron at 1,127 MB RSS, that is 471 MB anonymous (+60 MB) and
656 MB file-backed (+385 MB, the safetensors file). So the 1,238 MB against 670 MB seen on a 538 MB
fp32 SmolLM2 file is the file's pages, not a copy of the model.
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
FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")
# Runs in the measured process: a thread keeps the largest value of each field seen.
SAMPLER = f"""
import json as _json, resource as _resource, threading as _threading, time as _time
_peaks = dict.fromkeys({FIELDS!r}, 0)
def _sample():
    while True:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in _peaks:
                    _peaks[key] = max(_peaks[key], int(value.split()[0]))
        _time.sleep(0.002)
_threading.Thread(target=_sample, daemon=True).start()
"""
REPORT = """
_time.sleep(0.01)
with open("/proc/self/status") as f:
    _hwm = next(int(x.split()[1]) for x in f if x.startswith("VmHWM:"))
print("PEAKS_KB", _json.dumps({**_peaks, "VmHWM": _hwm}))
"""


def child_peaks_mb(code: str) -> dict[str, float]:
    """Peak memory (MB) of a fresh Python process running ``code``, as the process itself saw it:
    ``rss`` (VmHWM, the kernel's exact peak) and the sampled peaks ``anon``, ``file``, ``shmem``."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", SAMPLER + code + "\n" + REPORT],
        check=True, cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    line = next(x for x in out.stdout.splitlines() if x.startswith("PEAKS_KB"))
    kb = json.loads(line.split(maxsplit=1)[1])
    return {"rss": kb["VmHWM"] / 1024, "anon": kb["RssAnon"] / 1024, "file": kb["RssFile"] / 1024,
            "shmem": kb["RssShmem"] / 1024}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=40)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--single-file", action="store_true", help="one model.safetensors, not 200 MB shards")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import torch
    import transformers

    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    work = Path(tempfile.mkdtemp(prefix="convmem"))
    cfg = transformers.Qwen3Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 128, num_key_value_heads=max(1, args.hidden // 512), head_dim=128,
        tie_word_embeddings=False,
    )  # fmt: skip
    with torch.device("meta"):
        model = transformers.Qwen3ForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for prm in model.parameters():
            prm.normal_(0, 0.02)
    model.save_pretrained(work / "hf", max_shard_size="100GB" if args.single_file else "200MB")
    sizes = {n: p.numel() * p.element_size() for n, p in model.named_parameters()}
    del model
    model_mb = sum(sizes.values()) / 2**20
    largest_mb = max(sizes.values()) / 2**20
    files = sorted(f.name for f in (work / "hf").glob("*.safetensors"))

    imports = "import torch, megatron.core, transformers, safetensors, megatron_sdar.model"
    base = child_peaks_mb(imports)
    to_mcore = child_peaks_mb(
        "from tools import convert_hf_to_mcore as c; "
        f"c.main(['--hf-dir', '{work / 'hf'}', '--save', '{work / 'ckpt'}', '--dtype', '{args.dtype}'])"
    )
    to_hf = child_peaks_mb(
        "from tools import convert_mcore_to_hf as c; "
        f"c.main(['--load', '{work / 'ckpt'}', '--save', '{work / 'back'}', '--format', 'ar', "
        f"'--dtype', '{args.dtype}', '--max-shard-size-mb', '100'])"
    )
    result = {
        "model_mb": round(model_mb),
        "dtype": args.dtype,
        "safetensors_files": len(files),
        "largest_parameter_mb": round(largest_mb),
        **{f"import_only_peak_{k}_mb": round(v) for k, v in base.items()},
        **{f"hf_to_mcore_peak_{k}_mb": round(v) for k, v in to_mcore.items()},
        **{f"mcore_to_hf_peak_{k}_mb": round(v) for k, v in to_hf.items()},
    }
    print(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    for name, peaks in (("HF -> Megatron", to_mcore), ("Megatron -> HF", to_hf)):
        print(
            f"{name}: peak RSS {peaks['rss']:.0f} MB, {peaks['rss'] - base['rss']:.0f} MB above imports; "
            f"anonymous {peaks['anon']:.0f} MB, {peaks['anon'] - base['anon']:.0f} MB above imports "
            f"(largest parameter {largest_mb:.0f} MB); file-backed {peaks['file']:.0f} MB "
            f"(imports alone {base['file']:.0f} MB)"
        )
    print(
        f"The {model_mb:.0f} MB model ({len(files)} safetensors file(s)): the HF -> Megatron RSS above "
        "imports is mostly file-backed pages of the memory-mapped safetensors, which the kernel can drop; "
        "the anonymous memory above imports is what the conversion itself holds."
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
