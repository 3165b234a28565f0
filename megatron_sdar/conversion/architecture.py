"""The model shape HF and Megatron checkpoints agree on, as Megatron flags and as checks against them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


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
    clean_attention: str = "block_causal"  # how the clean half attends to itself (block_causal / causal)
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
    for name, value in (("vocabulary divisor", divisible_by), ("tensor parallel size", tensor_parallel)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"the {name} must be a positive integer, not {value!r}")
    multiple = divisible_by * tensor_parallel
    return -(-vocab_size // multiple) * multiple


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
        clean_attention=str(getattr(args, "sdar_clean_attention", None) or "block_causal"),
        num_experts=experts,
        moe_ffn_hidden_size=int(getattr(args, "moe_ffn_hidden_size", None) or 0) if experts else 0,
        moe_router_topk=int(getattr(args, "moe_router_topk", 0) or 0) if experts else 0,
        moe_norm_topk_prob=not getattr(args, "moe_router_pre_softmax", False),
        moe_aux_loss_coeff=float(getattr(args, "moe_aux_loss_coeff", 0.0) or 0.0) if experts else 0.0,
    )
