"""Reading HF checkpoints (config, sharded safetensors) lazily; refusing architectures not implemented."""

from __future__ import annotations

import json
import os
from typing import Any

from megatron_sdar.conversion.architecture import Architecture, padded_vocab

# The tools' --dtype names -> torch dtype attribute names (and HF config ``torch_dtype`` values).
DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}
# safetensors header dtype codes -> torch dtype attribute names (the floating-point ones)
SAFETENSORS_FLOATS = {
    "BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip


SUPPORTED = {
    "LlamaForCausalLM": "llama",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "SDARForCausalLM": "qwen3",
    "SDARMoeForCausalLM": "qwen3_moe",
}


# config.json keys every supported architecture needs, each a positive integer
REQUIRED_CONFIG_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                        "vocab_size")  # fmt: skip


def read_config(hf_dir: str) -> dict[str, Any]:
    """A HF model folder's ``config.json`` (a :class:`ValueError` naming the file if it is not a
    JSON object)."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: --hf-dir must be a HF model folder")
    return _read_json_object(path)


def _read_json_object(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def read_architecture(
    hf_dir: str, make_vocab_size_divisible_by: int = 128, tensor_parallel: int = 1
) -> Architecture:
    """Parse ``config.json``; refuse features the converter does not implement, saying which.

    Besides Llama/Qwen3/Qwen3-MoE configs this reads the released SDAR ones (``SDARForCausalLM`` /
    ``SDARMoeForCausalLM``): Qwen3's fields plus ``block_size`` and ``mask_token_id``, which are
    recorded; their remote-code and training switches (``auto_map``, ``fuse_cross_entropy``,
    ``attn_implementation``, ``ep_size``, ``use_deepep``, ...) do not change the weights and are
    ignored. ``sliding_window`` is a size only: sliding-window attention is in use when
    ``use_sliding_window`` is set or ``layer_types`` lists a sliding layer, which is refused.
    """
    cfg = read_config(hf_dir)
    path = os.path.join(hf_dir, "config.json")
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED), None)
    if arch is None:
        raise ValueError(f"{path}: unsupported architecture {archs}; supported: {sorted(SUPPORTED)}")
    missing = [k for k in REQUIRED_CONFIG_KEYS if k not in cfg]
    invalid = [
        f"{k} {cfg[k]!r}"
        for k in (*REQUIRED_CONFIG_KEYS, "num_key_value_heads", "head_dim")
        if cfg.get(k) is not None and not _positive_int(cfg[k])
    ]
    if missing or invalid:
        found = ([f"lacks {', '.join(missing)}"] if missing else []) + (
            [f"has {', '.join(invalid)} where a positive integer is needed"] if invalid else []
        )
        raise ValueError(f"{path} " + " and ".join(found) + f" (a {arch} config needs all of "
                         f"{', '.join(REQUIRED_CONFIG_KEYS)})")  # fmt: skip
    problems = []
    scaling = cfg.get("rope_scaling") or (cfg.get("rope_parameters") or {})
    if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
        problems.append(f"rope scaling {scaling} is not implemented")
    if cfg.get("use_sliding_window") or "sliding_attention" in (cfg.get("layer_types") or []):
        problems.append("sliding-window attention is not implemented")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        problems.append("attention/MLP biases are not implemented")
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"activation {cfg.get('hidden_act')} is not implemented (SwiGLU/silu only)")
    moe = SUPPORTED[arch] == "qwen3_moe"
    if moe:
        if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
            problems.append("dense layers between MoE layers (mlp_only_layers / decoder_sparse_step) are not "
                            "implemented")  # fmt: skip
        if cfg.get("shared_expert_intermediate_size"):
            problems.append("shared experts are not implemented")
        if "num_experts" not in cfg and "num_local_experts" in cfg:  # transformers 5 writes this name
            cfg["num_experts"] = cfg["num_local_experts"]
        missing = [
            k for k in ("num_experts", "moe_intermediate_size", "num_experts_per_tok") if not cfg.get(k)
        ]
        if missing:
            problems.append(f"the MoE config lacks {', '.join(missing)}")
    vocab = cfg["vocab_size"]
    mask = cfg.get("mask_token_id")
    if mask is not None and not (isinstance(mask, int) and 0 <= mask < vocab):
        problems.append(f"mask_token_id {mask!r} is not a row of the {vocab}-row embedding (vocab_size)")
    block = cfg.get("block_size")
    clean = cfg.get("clean_attention", "block_causal")
    if clean not in ("block_causal", "causal"):
        problems.append(f"clean_attention {clean!r} is neither block_causal nor causal")
    if block is not None and not (isinstance(block, int) and block > 0):
        problems.append(f"block_size {block!r} is not a positive integer")
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return Architecture(
        family=SUPPORTED[arch],
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=kv,
        kv_channels=head_dim,
        vocab_size=vocab,
        padded_vocab_size=padded_vocab(vocab, make_vocab_size_divisible_by, tensor_parallel),
        rotary_base=float(theta),
        norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        qk_layernorm=SUPPORTED[arch] in ("qwen3", "qwen3_moe"),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        mask_token_id=mask,
        block_size=block,
        clean_attention=clean,
        num_experts=int(cfg["num_experts"]) if moe else 0,
        moe_ffn_hidden_size=int(cfg["moe_intermediate_size"]) if moe else 0,
        moe_router_topk=int(cfg["num_experts_per_tok"]) if moe else 0,
        moe_norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
        moe_aux_loss_coeff=float(cfg.get("router_aux_loss_coef", 0.001)) if moe else 0.0,
    )


def _open_safetensors(safe_open: Any, path: str) -> Any:
    try:
        return safe_open(path, "pt")
    except Exception as err:  # safetensors raises its own SafetensorError (an Exception) or OSError
        raise ValueError(
            f"cannot read {path}: {err} (truncated or damaged? copy or download it again)"
        ) from None


class SafetensorsReader:
    """Tensors of a single-file or sharded (with index) safetensors checkpoint, opened lazily.

    A file that cannot be read (truncated, damaged, or an index that does not match its shards)
    raises a :class:`ValueError` naming it.
    """

    def __init__(self, hf_dir: str) -> None:
        from safetensors import safe_open

        index = os.path.join(hf_dir, "model.safetensors.index.json")
        single = os.path.join(hf_dir, "model.safetensors")
        if os.path.isfile(index):
            weight_map = _read_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError(f"{index} has no weight_map from tensor names to shard files")
        elif os.path.isfile(single):
            with _open_safetensors(safe_open, single) as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(
                f"{hf_dir} has neither model.safetensors nor model.safetensors.index.json"
            )
        missing = sorted({s for s in weight_map.values() if not os.path.isfile(os.path.join(hf_dir, s))})
        if missing:
            raise FileNotFoundError(f"{hf_dir}: shard files listed in the index are missing: {missing}")
        self.hf_dir = hf_dir
        self.weight_map = weight_map
        self._open: dict[str, Any] = {}
        self._safe_open = safe_open

    def names(self) -> list[str]:
        return list(self.weight_map)

    def stored_dtypes(self) -> dict[str, int]:
        """How many tensors are stored in each dtype (torch names, or the safetensors code of a
        non-floating dtype), from the shard headers; no tensor data is read."""
        counts: dict[str, int] = {}
        for shard in sorted(set(self.weight_map.values())):
            names = [n for n, s in self.weight_map.items() if s == shard]
            path = os.path.join(self.hf_dir, shard)
            with _open_safetensors(self._safe_open, path) as f:
                listed = set(f.keys())
                absent = [n for n in names if n not in listed]
                if absent:
                    raise ValueError(
                        f"{path} lacks {len(absent)} tensors that model.safetensors.index.json places "
                        f"there (e.g. {absent[0]})"
                    )
                codes = [f.get_slice(n).get_dtype() for n in names]
            for code in codes:
                name = SAFETENSORS_FLOATS.get(code, code)
                counts[name] = counts.get(name, 0) + 1
        return counts

    def __call__(self, name: str):
        if name not in self.weight_map:
            raise KeyError(f"{name} is not in the HF checkpoint at {self.hf_dir}")
        shard = self.weight_map[name]
        path = os.path.join(self.hf_dir, shard)
        if shard not in self._open:
            self._open[shard] = _open_safetensors(self._safe_open, path)
        try:
            return self._open[shard].get_tensor(name)
        except Exception as err:
            raise ValueError(f"cannot read {name} from {path}: {err}") from None


def default_dtype(cfg: dict[str, Any], stored: dict[str, int]) -> tuple[str, str]:
    """``(torch dtype name, where it came from)`` for a conversion given no ``--dtype``; ``stored``
    counts the checkpoint's tensors by dtype (:meth:`SafetensorsReader.stored_dtypes`).

    The config's dtype comes first (``dtype`` as transformers 5 writes it, else ``torch_dtype``,
    the order transformers reads them in): it is the dtype HF loads the model in. A config without
    one (or with ``"auto"``) falls back to the dtype the floating-point tensors are stored in,
    which must then be one dtype.
    """
    for key in ("dtype", "torch_dtype"):
        value = cfg.get(key)
        if value is None:
            continue
        name = str(value).removeprefix("torch.")
        if name in DTYPES.values():
            return name, f"config.json {key}"
        if name != "auto":
            raise ValueError(
                f"config.json {key} is {value!r}, which the converters do not write; pass --dtype "
                f"({'/'.join(sorted(DTYPES))})"
            )
        break
    floats = {k: n for k, n in stored.items() if k in SAFETENSORS_FLOATS.values()}
    if len(floats) == 1 and next(iter(floats)) in DTYPES.values():
        return next(iter(floats)), "the stored safetensors tensors (config.json names no dtype)"
    found = ", ".join(f"{n} {k}" for k, n in sorted(floats.items())) or "no floating-point tensors"
    raise ValueError(
        f"config.json names no dtype and the tensors do not settle it ({found}); pass --dtype "
        f"({'/'.join(sorted(DTYPES))})"
    )
