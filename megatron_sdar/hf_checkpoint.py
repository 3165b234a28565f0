"""Reading HF checkpoints (config, sharded safetensors) lazily, and what their architecture means
for Megatron: the flags a training run needs and the checks that refuse what is not implemented."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any

# The tools' --dtype names -> torch dtype attribute names (and HF config ``torch_dtype`` values).
DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}

SUPPORTED = {
    "LlamaForCausalLM": "llama",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "SDARForCausalLM": "qwen3",
    "SDARMoeForCausalLM": "qwen3_moe",
}


@dataclass
class Architecture:
    """The model shape both sides agree on; ``megatron_args`` turns it into Megatron flags."""

    family: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int  # rows in the HF embedding
    padded_vocab_size: int  # rows in the Megatron checkpoint
    rotary_base: float
    norm_epsilon: float
    qk_layernorm: bool
    tied_embeddings: bool
    max_position_embeddings: int
    mask_token_id: int | None = None
    block_size: int | None = None
    # mixture of experts (Qwen3-MoE): every layer's MLP is a routed MoE without shared experts
    num_experts: int = 0
    moe_ffn_hidden_size: int = 0
    moe_router_topk: int = 0
    moe_norm_topk_prob: bool = True  # renormalise the top-k probabilities (Megatron: softmax after top-k)
    moe_aux_loss_coeff: float = 0.0

    def megatron_args(self) -> list[str]:
        """The architecture flags for ``pretrain_sdar.py``."""
        args = [
            "--num-layers", str(self.num_layers), "--hidden-size", str(self.hidden_size),
            "--ffn-hidden-size", str(self.ffn_hidden_size),
            "--num-attention-heads", str(self.num_attention_heads),
            "--group-query-attention", "--num-query-groups", str(self.num_query_groups),
            "--kv-channels", str(self.kv_channels), "--normalization", "RMSNorm",
            "--norm-epsilon", repr(self.norm_epsilon), "--swiglu", "--disable-bias-linear",
            "--position-embedding-type", "rope", "--rotary-base", str(int(self.rotary_base)),
            "--max-position-embeddings", str(self.max_position_embeddings),
            # Qwen3 and Llama train without dropout, and SDAR attention has none.
            "--attention-dropout", "0", "--hidden-dropout", "0",
        ]  # fmt: skip
        if self.qk_layernorm:
            args.append("--qk-layernorm")
        if not self.tied_embeddings:
            args.append("--untie-embeddings-and-output-weights")
        if self.num_experts:
            args += [
                "--num-experts", str(self.num_experts),
                "--moe-ffn-hidden-size", str(self.moe_ffn_hidden_size),
                "--moe-router-topk", str(self.moe_router_topk),
                "--moe-router-load-balancing-type", "aux_loss",
                "--moe-aux-loss-coeff", repr(self.moe_aux_loss_coeff),
            ]  # fmt: skip
            if not self.moe_norm_topk_prob:
                args.append("--moe-router-pre-softmax")
        if self.mask_token_id is not None:
            args += ["--sdar-mask-token-id", str(self.mask_token_id)]
        return args

    def to_json(self) -> dict[str, Any]:
        return {"architecture": asdict(self), "megatron_args": self.megatron_args()}


def padded_vocab(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """Megatron's padded vocabulary size (a multiple of ``divisible_by * tensor_parallel``)."""
    multiple = divisible_by * tensor_parallel
    return -(-vocab_size // multiple) * multiple


def read_architecture(
    hf_dir: str, make_vocab_size_divisible_by: int = 128, tensor_parallel: int = 1
) -> Architecture:
    """Parse ``config.json``; refuse features the converter does not implement, saying which."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: --hf-dir must be a HF model folder")
    with open(path) as f:
        cfg = json.load(f)
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED), None)
    if arch is None:
        raise ValueError(f"unsupported architecture {archs}; supported: {sorted(SUPPORTED)}")
    problems = []
    scaling = cfg.get("rope_scaling") or (cfg.get("rope_parameters") or {})
    if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
        problems.append(f"rope scaling {scaling} is not implemented")
    if cfg.get("use_sliding_window"):
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
    if problems:
        raise ValueError(f"{hf_dir}: " + "; ".join(problems))
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
        vocab_size=cfg["vocab_size"],
        padded_vocab_size=padded_vocab(cfg["vocab_size"], make_vocab_size_divisible_by, tensor_parallel),
        rotary_base=float(theta),
        norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        qk_layernorm=SUPPORTED[arch] in ("qwen3", "qwen3_moe"),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        mask_token_id=cfg.get("mask_token_id"),
        block_size=cfg.get("block_size"),
        num_experts=int(cfg["num_experts"]) if moe else 0,
        moe_ffn_hidden_size=int(cfg["moe_intermediate_size"]) if moe else 0,
        moe_router_topk=int(cfg["num_experts_per_tok"]) if moe else 0,
        moe_norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
        moe_aux_loss_coeff=float(cfg.get("router_aux_loss_coef", 0.001)) if moe else 0.0,
    )


class SafetensorsReader:
    """Tensors of a single-file or sharded (with index) safetensors checkpoint, opened lazily."""

    def __init__(self, hf_dir: str) -> None:
        from safetensors import safe_open

        index = os.path.join(hf_dir, "model.safetensors.index.json")
        single = os.path.join(hf_dir, "model.safetensors")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.isfile(single):
            with safe_open(single, "pt") as f:
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

    def __call__(self, name: str):
        if name not in self.weight_map:
            raise KeyError(f"{name} is not in the HF checkpoint at {self.hf_dir}")
        shard = self.weight_map[name]
        if shard not in self._open:
            try:
                self._open[shard] = self._safe_open(os.path.join(self.hf_dir, shard), "pt")
            except Exception as err:  # truncated or corrupt shard
                raise ValueError(f"cannot read {shard} in {self.hf_dir}: {err}") from err
        try:
            return self._open[shard].get_tensor(name)
        except Exception as err:
            raise ValueError(f"cannot read {name} from {shard}: {err}") from err


ARCHITECTURE_FILE = "sdar_architecture.json"


def architecture_mismatches(arch: Architecture, args: Any) -> list[str]:
    """Fields where Megatron's parsed ``args`` disagree with a checkpoint's recorded architecture."""
    groups = (
        args.num_query_groups if getattr(args, "group_query_attention", False) else args.num_attention_heads
    )
    kv_channels = args.kv_channels or args.hidden_size // args.num_attention_heads
    pairs = {
        "--num-layers": (arch.num_layers, args.num_layers),
        "--hidden-size": (arch.hidden_size, args.hidden_size),
        "--ffn-hidden-size": (arch.ffn_hidden_size, args.ffn_hidden_size),
        "--num-attention-heads": (arch.num_attention_heads, args.num_attention_heads),
        "--num-query-groups": (arch.num_query_groups, groups),
        "--kv-channels": (arch.kv_channels, kv_channels),
        "--qk-layernorm": (arch.qk_layernorm, bool(args.qk_layernorm)),
        "--untie-embeddings-and-output-weights": (
            not arch.tied_embeddings,
            bool(args.untie_embeddings_and_output_weights),
        ),
        "--rotary-base": (int(arch.rotary_base), int(args.rotary_base)),
        "--norm-epsilon": (arch.norm_epsilon, args.layernorm_epsilon),
        "--swiglu": (True, bool(args.swiglu)),
        "--normalization": ("RMSNorm", args.normalization),
        "--num-experts": (arch.num_experts or None, getattr(args, "num_experts", None) or None),
    }
    if arch.num_experts:
        pairs["--moe-ffn-hidden-size"] = (
            arch.moe_ffn_hidden_size,
            getattr(args, "moe_ffn_hidden_size", None),
        )
        pairs["--moe-router-topk"] = (arch.moe_router_topk, getattr(args, "moe_router_topk", None))
        pairs["--moe-router-pre-softmax"] = (
            not arch.moe_norm_topk_prob,
            bool(getattr(args, "moe_router_pre_softmax", False)),
        )
    if getattr(args, "padded_vocab_size", None) is not None:
        pairs["padded vocabulary (tokenizer, --make-vocab-size-divisible-by, TP)"] = (
            arch.padded_vocab_size,
            args.padded_vocab_size,
        )
    return [
        f"{flag}: checkpoint has {ckpt}, flags give {given}"
        for flag, (ckpt, given) in pairs.items()
        if ckpt != given
    ]


def check_checkpoint_architecture(checkpoint_dir: str | None, args: Any) -> None:
    """Refuse to start from a converted checkpoint whose architecture disagrees with the flags."""
    if not checkpoint_dir:
        return
    path = os.path.join(checkpoint_dir, ARCHITECTURE_FILE)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        arch = Architecture(**json.load(f)["architecture"])
    problems = architecture_mismatches(arch, args)
    if problems:
        raise ValueError(
            f"the checkpoint in {checkpoint_dir} was converted for a different architecture; use the flags "
            f"in {path} ('megatron_args'):\n  - " + "\n  - ".join(problems)
        )


def moe_config(arch: Architecture, dispatcher: str = "allgather") -> dict[str, Any]:
    """``TransformerConfig`` fields for ``arch``'s experts (empty for dense models)."""
    if not arch.num_experts:
        return {}
    return dict(
        num_moe_experts=arch.num_experts, moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
        moe_router_topk=arch.moe_router_topk, moe_router_pre_softmax=not arch.moe_norm_topk_prob,
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=arch.moe_aux_loss_coeff,
        moe_token_dispatcher_type=dispatcher, moe_grouped_gemm=False,
    )  # fmt: skip


def meta_model(arch: Architecture) -> Any:
    """The SDAR model for ``arch`` at TP=PP=1 on the ``meta`` device: parameter names, shapes and
    Megatron's checkpoint layout without allocating weights."""
    import torch

    from megatron_sdar.config import SDARConfig
    from megatron_sdar.model import build_sdar_model, qwen3_transformer_config
    from megatron_sdar.parallel import ensure_single_process_world

    ensure_single_process_world()
    config = qwen3_transformer_config(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads, num_query_groups=arch.num_query_groups,
        kv_channels=arch.kv_channels, layernorm_epsilon=arch.norm_epsilon, qk_layernorm=arch.qk_layernorm,
        use_cpu_initialization=True, perform_initialization=False, **moe_config(arch),
    )  # fmt: skip
    with torch.device("meta"):
        return build_sdar_model(
            config, SDARConfig(), vocab_size=arch.padded_vocab_size,
            max_sequence_length=arch.max_position_embeddings,
            share_embeddings_and_output_weights=arch.tied_embeddings, rotary_base=arch.rotary_base,
        )  # fmt: skip


def architecture_from_megatron_args(args: Any, vocab_size: int | None = None) -> Architecture:
    """The architecture of a checkpoint written by training, from the Megatron arguments it stores.

    The HF vocabulary size is not among them; it defaults to the padded size (Qwen3's and Llama's
    vocabularies are already multiples of 128) unless given.
    """
    problems = []
    experts = int(getattr(args, "num_experts", None) or 0)
    if experts and not getattr(args, "qk_layernorm", False):
        problems.append("mixture of experts without QK-norm (only Qwen3-MoE is exported)")
    if experts and (
        getattr(args, "moe_shared_expert_intermediate_size", None) or getattr(args, "moe_layer_freq", 1) != 1
    ):
        problems.append("shared experts or dense layers between MoE layers")
    if getattr(args, "normalization", "RMSNorm") != "RMSNorm":
        problems.append(f"normalization {args.normalization} (only RMSNorm)")
    if not getattr(args, "swiglu", False):
        problems.append("MLP without SwiGLU")
    if getattr(args, "add_bias_linear", False) or getattr(args, "add_qkv_bias", False):
        problems.append("linear biases")
    if getattr(args, "position_embedding_type", "rope") != "rope":
        problems.append(f"position embedding {args.position_embedding_type} (only rope)")
    if problems:
        raise ValueError("this checkpoint's model cannot be exported to Qwen3/Llama: " + "; ".join(problems))
    padded = int(args.padded_vocab_size)
    if vocab_size is not None and not 0 < vocab_size <= padded:
        raise ValueError(
            f"vocabulary size {vocab_size} must be in 1..{padded} (the checkpoint's padded rows)"
        )
    heads = int(args.num_attention_heads)
    groups = int(args.num_query_groups) if getattr(args, "group_query_attention", False) else heads
    return Architecture(
        family=("qwen3_moe" if experts else "qwen3") if getattr(args, "qk_layernorm", False) else "llama",
        num_layers=int(args.num_layers),
        hidden_size=int(args.hidden_size),
        ffn_hidden_size=int(args.ffn_hidden_size),
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=int(args.kv_channels or args.hidden_size // heads),
        vocab_size=vocab_size or padded,
        padded_vocab_size=padded,
        rotary_base=float(args.rotary_base),
        norm_epsilon=float(args.layernorm_epsilon),
        qk_layernorm=bool(getattr(args, "qk_layernorm", False)),
        tied_embeddings=not getattr(args, "untie_embeddings_and_output_weights", False),
        max_position_embeddings=int(args.max_position_embeddings),
        mask_token_id=getattr(args, "sdar_mask_token_id", None),
        block_size=getattr(args, "sdar_block_size", None),
        num_experts=experts,
        moe_ffn_hidden_size=int(getattr(args, "moe_ffn_hidden_size", None) or 0) if experts else 0,
        moe_router_topk=int(getattr(args, "moe_router_topk", 0) or 0) if experts else 0,
        moe_norm_topk_prob=not getattr(args, "moe_router_pre_softmax", False),
        moe_aux_loss_coeff=float(getattr(args, "moe_aux_loss_coeff", 0.0) or 0.0) if experts else 0.0,
    )


def resolve_checkpoint(load: str, iteration: str | None = None) -> str:
    """The ``release`` or ``iter_*`` directory of a Megatron checkpoint folder."""
    tracker = os.path.join(load, "latest_checkpointed_iteration.txt")
    if iteration is None:
        if not os.path.isfile(tracker):
            raise ValueError(f"{tracker} not found: pass a Megatron checkpoint directory")
        with open(tracker) as f:
            iteration = f.read().strip()
    name = "release" if iteration == "release" else f"iter_{int(iteration):07d}"
    path = os.path.join(load, name)
    if not os.path.isfile(os.path.join(path, "metadata.json")):
        raise ValueError(f"{path} is not a torch_dist checkpoint (no metadata.json)")
    return path


def checkpoint_architecture(
    load: str, path: str, vocab_size: int | None = None, recorded: str | None = None
) -> tuple[Architecture, Any]:
    """``(architecture, stored Megatron args or None)``: from ``sdar_architecture.json`` (``recorded``,
    default next to ``load``) when the converter wrote one, else from the arguments a training run
    stored in the checkpoint ``path``."""
    recorded = recorded or os.path.join(load, ARCHITECTURE_FILE)
    if os.path.isfile(recorded):
        with open(recorded) as f:
            arch = Architecture(**json.load(f)["architecture"])
        if vocab_size is not None:
            arch.vocab_size = vocab_size
        return arch, None
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict

    saved = load_common_state_dict(path).get("args")
    if saved is None:
        raise ValueError(f"{recorded} not found and {path} stores no Megatron arguments")
    return architecture_from_megatron_args(saved, vocab_size), saved
