"""What an HF export holds besides its weights: config.json for the SDAR serving stack (or a plain
Qwen3/Llama), the remote-code model, generation defaults, and a tokenizer that names its mask token.

The SDAR config carries every field a released SDAR config does, so engines that route on
``model_type`` / ``architectures`` or read fields by name find them: the architecture fields with
Qwen3 / Qwen3-MoE names, ``block_size``, ``mask_token_id``, ``auto_map`` to the remote code shipped
in the folder, and the released configs' switches (``fuse_cross_entropy``, ``ep_size``, ...) at the
values that describe an exported model.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from typing import Any

from megatron_sdar.conversion import remote_code
from megatron_sdar.conversion.architecture import Architecture

HF_CLASSES = {
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
    "llama": ("LlamaForCausalLM", "llama"),
}
# Decoding defaults written to generation_config.json (the remote model's generate reads them).
DECODING_DEFAULTS = {"remasking_strategy": "low_confidence_dynamic", "confidence_threshold": 0.9}


def special_token_ids(tokenizer_dir: str | None) -> dict[str, int]:
    """``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` from the source's generation_config.json,
    else from the tokenizer's own special tokens."""
    found: dict[str, int] = {}
    if not tokenizer_dir or not os.path.isdir(tokenizer_dir):
        return found
    path = os.path.join(tokenizer_dir, "generation_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            generation = json.load(f)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = generation.get(key)
            if isinstance(value, list):
                value = value[0] if value else None
            if isinstance(value, int):
                found[key] = value
    tokenizer = _load_tokenizer(tokenizer_dir)
    if tokenizer is not None:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(tokenizer, key, None)
            if key not in found and isinstance(value, int):
                found[key] = value
    return found


def _load_tokenizer(folder: str) -> Any | None:
    """The folder's tokenizer, or None. An export's config.json (model type ``sdar``) is unknown to
    transformers, which says so while looking for the tokenizer class: that notice, and its
    ``rope_scaling`` deprecation for the same config, are about the model, not the tokenizer."""
    from megatron_sdar.data.tokenizer import has_tokenizer_files, load_hf_tokenizer

    if not has_tokenizer_files(folder):
        return None
    try:
        import transformers
    except ImportError:
        return None
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`rope_scaling` is deprecated", category=FutureWarning)
            tokenizer = load_hf_tokenizer(folder)
    except Exception:  # files this transformers cannot read
        return None
    finally:
        transformers.logging.set_verbosity(verbosity)
    return tokenizer


def hf_config(arch: Architecture, fmt: str, dtype: str, special: dict[str, int] | None = None) -> dict:
    """config.json for ``fmt`` ``"sdar"`` (remote-code SDAR model) or ``"ar"`` (plain Qwen3/Llama)."""
    cls, base_type = HF_CLASSES[arch.family]
    config: dict[str, Any] = {
        "architectures": [cls],
        "model_type": base_type,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "head_dim": arch.kv_channels,
        "hidden_act": "silu",
        "hidden_size": arch.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": arch.ffn_hidden_size,
        "max_position_embeddings": arch.max_position_embeddings,
        "num_attention_heads": arch.num_attention_heads,
        "num_hidden_layers": arch.num_layers,
        "num_key_value_heads": arch.num_query_groups,
        "rms_norm_eps": arch.norm_epsilon,
        "rope_scaling": None,
        "rope_theta": arch.rotary_base,
        "tie_word_embeddings": arch.tied_embeddings,
        "torch_dtype": dtype,
        "use_cache": True,
        "vocab_size": arch.vocab_size,
        **(special or {}),
    }
    if arch.family != "llama":
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=arch.num_layers)
    if arch.num_experts:
        config.update(
            num_experts=arch.num_experts, num_experts_per_tok=arch.moe_router_topk,
            moe_intermediate_size=arch.moe_ffn_hidden_size, norm_topk_prob=arch.moe_norm_topk_prob,
            router_aux_loss_coef=arch.moe_aux_loss_coeff, output_router_logits=False,
            decoder_sparse_step=1, mlp_only_layers=[],
        )  # fmt: skip
    if fmt == "sdar":
        if arch.mask_token_id is None or arch.block_size is None:
            raise ValueError(
                "--format sdar needs the mask token id and block size (record them at conversion or "
                "pass --mask-token-id and --block-size)"
            )
        if not 0 <= arch.mask_token_id < arch.vocab_size:
            raise ValueError(
                f"mask token id {arch.mask_token_id} is outside the exported vocabulary of {arch.vocab_size} "
                "rows (pass --vocab-size to keep more rows)"
            )
        moe = bool(arch.num_experts)
        config.update(
            architectures=["SDARMoeForCausalLM" if moe else "SDARForCausalLM"],
            model_type="sdar_moe" if moe else "sdar",
            auto_map=remote_code.auto_map(moe),
            base_model_type=base_type,
            block_size=arch.block_size,
            mask_token_id=arch.mask_token_id,
            clean_attention=arch.clean_attention,
            qk_norm=arch.qk_layernorm,
            attn_implementation="sdpa",
            fuse_cross_entropy=True,
            # the released configs' training switches, at the values of a plain (unsharded) model
            ep_size=1, micro_forward=False, skip_checkpoint=False, use_deepep=False, debug=False,
        )  # fmt: skip
        if arch.family == "llama":
            config.update(use_sliding_window=False, sliding_window=None, max_window_layers=arch.num_layers)
    try:
        import transformers

        config["transformers_version"] = transformers.__version__
    except ImportError:
        pass
    return dict(sorted(config.items(), key=lambda kv: (kv[0] not in ("architectures", "auto_map"), kv[0])))


def write_remote_code(folder: str, moe: bool) -> list[str]:
    """Copy the remote-code model files into ``folder``."""
    names = remote_code.files_for(moe)
    for name in names:
        shutil.copyfile(os.path.join(remote_code.DIRECTORY, name), os.path.join(folder, name))
    return list(names)


def write_generation_config(folder: str, config: dict, fmt: str) -> None:
    """generation_config.json: the source's (if copied in), with the special ids and, for SDAR, the
    block-diffusion decoding defaults the remote ``generate`` reads."""
    path = os.path.join(folder, "generation_config.json")
    generation: dict[str, Any] = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            generation = json.load(f)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in config and key not in generation:
            generation[key] = config[key]
    if fmt == "sdar":
        generation.update(block_size=config["block_size"], mask_token_id=config["mask_token_id"])
        for key, value in DECODING_DEFAULTS.items():
            generation.setdefault(key, value)
    if "transformers_version" in config:
        generation["transformers_version"] = config["transformers_version"]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(generation, f, indent=2)


def set_mask_token(folder: str, mask_token_id: int) -> tuple[str | None, str]:
    """Name the mask token in the tokenizer files of ``folder`` (``mask_token`` in
    tokenizer_config.json and special_tokens_map.json), editing the JSON in place so the files stay
    readable by the transformers version that wrote them. Returns ``(token, "")``, or ``(None,
    why not)`` when the folder has no tokenizer that knows the id."""
    tokenizer = _load_tokenizer(folder)
    token = None
    if tokenizer is not None and mask_token_id < len(tokenizer):
        token = tokenizer.convert_ids_to_tokens(mask_token_id)
    if not isinstance(token, str):
        what = "no tokenizer" if tokenizer is None else f"a tokenizer without a token for id {mask_token_id}"
        return None, (
            f"the export holds {what}; tools that read the mask token from the tokenizer will not find "
            "it (config.json records mask_token_id; pass --tokenizer-dir to copy a tokenizer in)"
        )
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(folder, name)
        if not os.path.isfile(path) and name == "tokenizer_config.json":
            continue
        data: dict[str, Any] = {}
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        data["mask_token"] = token
        if data.get("tokenizer_class") == "TokenizersBackend":  # transformers 5's name; 4.x reads this one
            data["tokenizer_class"] = "PreTrainedTokenizerFast"
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
    reloaded = _load_tokenizer(folder)
    if reloaded is None or reloaded.mask_token_id != mask_token_id:
        raise ValueError(
            f"the tokenizer in {folder} does not report mask token {token!r} as id {mask_token_id} after "
            "naming it; check its added tokens"
        )
    return token, ""
