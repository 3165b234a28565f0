"""Load an SDAR export as a serving user does, in a fresh interpreter where neither this project nor
Megatron can be imported, and save what the remote-code model computes for the test to compare.

    python tests/remote_code_worker.py EXPORT_DIR REQUEST.pt RESULT.pt
"""

from __future__ import annotations

import importlib.abc
import sys

BLOCKED = ("megatron_sdar", "megatron", "tools", "tests")


class _Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{name} must not be importable when loading an export")
        return None


sys.meta_path.insert(0, _Refuse())
sys.path = [p for p in sys.path if not p.endswith("/tests")]


def main() -> None:
    import os

    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, request_path, result_path = sys.argv[1:4]
    request = torch.load(request_path)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model, info = AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=True, output_loading_info=True, **{dtype_key: torch.float32}
    )
    model.eval()
    result = {
        "transformers": transformers.__version__,
        "config_class": type(config).__name__,
        "model_class": type(model).__name__,
        "model_type": config.model_type,
        "block_size": config.block_size,
        "mask_token_id": config.mask_token_id,
        "missing": sorted(info["missing_keys"]),
        "unexpected": sorted(info["unexpected_keys"]),
        "mismatched": sorted(str(k) for k in info["mismatched_keys"]),
    }
    layout = request["layout"]
    with torch.no_grad():
        result["noised_logits"] = model(
            input_ids=layout["tokens"], training_layout=True, document_ids=layout["document_ids"]
        ).logits
        labels = layout["labels"]
        result["loss"] = model(
            input_ids=layout["tokens"],
            training_layout=True,
            document_ids=layout["document_ids"],
            labels=labels,
        ).loss
    generations = []
    for job in request["generate"]:
        prompts, kwargs = job["prompts"], job["kwargs"]
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        keep = torch.zeros(len(prompts), width, dtype=torch.long)
        for r, p in enumerate(prompts):  # left padding, as tokenizers produce for generation
            ids[r, width - len(p) :] = torch.tensor(p)
            keep[r, width - len(p) :] = 1
        out = model.generate(ids, attention_mask=keep, return_dict_in_generate=True, **kwargs)
        stops = kwargs.get("eos_token_id") or model.generation_config.eos_token_id
        stops = set(stops if isinstance(stops, list) else [] if stops is None else [stops])
        rows = []
        for row in out.sequences[:, width:].tolist():
            for i, t in enumerate(row):
                if t in stops:
                    row = row[: i + 1]
                    break
            rows.append(row)
        generations.append({"tokens": rows, "tokens_per_forward": out.tokens_per_forward})
    result["generate"] = generations
    if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        tok = AutoTokenizer.from_pretrained(folder)
        result["tokenizer_mask_token"] = tok.mask_token
        result["tokenizer_mask_token_id"] = tok.mask_token_id
    result["imported"] = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    torch.save(result, result_path)


if __name__ == "__main__":
    main()
