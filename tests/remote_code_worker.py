"""Load SDAR exports as a serving user does, in a fresh interpreter where neither this project nor
Megatron can be imported, and save what the remote-code model computes for the test to compare.

    python tests/remote_code_worker.py REQUEST.pt RESULT.pt

``REQUEST.pt`` holds ``{"exports": [{"name", "folder", "layout", "generate", "text_generate"?}, ...]}``;
every export is checked in this one interpreter (one start per transformers line instead of one per
export), and ``RESULT.pt`` holds ``{name: result}``. An export that fails gets ``{"error": traceback}``
and the others are still checked. Each result's ``imported`` lists the blocked modules loaded by the
time that export was done (so it covers the exports before it as well).
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


def _generate(model, jobs: list[dict]) -> list[dict]:
    import torch

    generations = []
    for job in jobs:
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
    return generations


def check_export(folder: str, request: dict) -> dict:
    """What the remote-code model in ``folder`` computes for ``request``."""
    import os

    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

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
    result["generate"] = _generate(model, request["generate"])
    if "text_generate" in request:
        result["text_generate"] = _generate(model, request["text_generate"])
    if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        tok = AutoTokenizer.from_pretrained(folder)
        result["tokenizer_mask_token"] = tok.mask_token
        result["tokenizer_mask_token_id"] = tok.mask_token_id
    return result


def main() -> None:
    import traceback

    import torch

    request_path, result_path = sys.argv[1:3]
    results = {}
    for request in torch.load(request_path)["exports"]:
        try:
            result = check_export(request["folder"], request)
        except Exception:
            result = {"error": traceback.format_exc()}
        result["imported"] = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        results[request["name"]] = result
    torch.save(results, result_path)


if __name__ == "__main__":
    main()
