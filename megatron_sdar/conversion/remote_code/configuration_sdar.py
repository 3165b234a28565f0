"""Configuration of an SDAR block-diffusion language model (a Qwen3-shaped decoder).

The architecture fields carry Qwen3's names and meanings, so tools that read Qwen3 configs read
these too. The SDAR fields are ``block_size`` (tokens denoised in parallel; blocks are counted from
each sequence's first token) and ``mask_token_id`` (the id that stands for a token still to be
decoded). ``clean_attention`` says how finished (clean) tokens attend to each other:
``block_causal`` (a token sees its whole block; the SDAR paper) or ``causal`` (token-causal; models
trained with that variant, e.g. with a joint next-token loss). ``qk_norm`` is false only for models
converted from Llama, which lack QK-norm.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class SDARConfig(PretrainedConfig):
    model_type = "sdar"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 151936,
        hidden_size: int = 2048,
        intermediate_size: int = 6144,
        num_hidden_layers: int = 28,
        num_attention_heads: int = 16,
        num_key_value_heads: int = 8,
        head_dim: int = 128,
        hidden_act: str = "silu",
        max_position_embeddings: int = 32768,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        rope_theta: float = 1000000.0,
        rope_scaling: dict | None = None,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        use_sliding_window: bool = False,
        sliding_window: int | None = None,
        max_window_layers: int = 28,
        qk_norm: bool = True,
        block_size: int = 4,
        mask_token_id: int = 151669,
        fuse_cross_entropy: bool = True,
        clean_attention: str = "block_causal",
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        if rope_scaling is not None:  # the model applies plain RoPE only
            raise ValueError(f"rope_scaling {rope_scaling} is not supported by this model (plain RoPE only)")
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.use_sliding_window = use_sliding_window
        self.sliding_window = sliding_window
        self.max_window_layers = max_window_layers
        self.qk_norm = qk_norm
        self.block_size = block_size
        self.mask_token_id = mask_token_id
        self.fuse_cross_entropy = fuse_cross_entropy
        if clean_attention not in ("block_causal", "causal"):
            raise ValueError(f"clean_attention must be block_causal or causal, got {clean_attention!r}")
        self.clean_attention = clean_attention
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
