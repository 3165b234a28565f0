"""SDAR block-diffusion language model for transformers (remote code shipped with the weights).

SDAR keeps autoregression across blocks of ``block_size`` tokens and denoises the tokens inside a
block in parallel. Blocks are counted from each sequence's first real token. Three ways to call it:

* ``model(input_ids)``: block-causal attention (a token sees its own block and every earlier one;
  token-causal for a model whose config says ``clean_attention: causal``, except for the last
  ``denoising`` new tokens, the block being denoised, which see their whole block). With
  ``past_key_values`` (an :class:`SDARCache`) the new tokens also see the cached ones; ``store_kv``
  says how many of the new tokens to append to the cache (``True``: all; a denoising forward stores
  none). ``use_cache=True`` without a cache starts one and stores everything.
* ``model(input_ids=torch.cat([x_t, x_0], -1), training_layout=True, labels=..., loss_weights=...)``:
  the training sequence (noised copy, then clean copy) under the SDAR training mask. Logits cover
  the noised half only (it predicts ``x_0`` at the same positions); with ``labels`` (``-100`` where
  not supervised) the loss is ``sum(loss_weights * CE) / num_items_in_batch`` (default: the number
  of supervised tokens). Pass ``loss_weights = 1 / p`` and the eligible-token count as
  ``num_items_in_batch`` for the block-diffusion bound. The mask is dense ``[b, 2L, 2L]``: meant
  for evaluation and modest fine-tuning, not for long-window training.
* ``model.generate(input_ids, ...)``: block-diffusion decoding with confidence-based remasking;
  defaults come from ``generation_config.json``.

Only ``torch`` and ``transformers`` are imported, so this file works wherever the folder is copied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    MoeModelOutputWithPast,
)
from transformers.utils import ModelOutput

from .configuration_sdar import SDARConfig

try:  # transformers 5: initialisers that leave weights loaded from the checkpoint alone
    from transformers import initialization as _init
except ImportError:  # transformers 4
    from torch.nn import init as _init

# transformers 5 renamed the outputs' ``past_key_values`` field to ``cache``
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
STRATEGIES = ("sequential", "low_confidence_static", "low_confidence_dynamic", "entropy_bounded")


class SDARCache:
    """Keys and values per layer ``[b, kv_heads, S, head_dim]`` with each cached token's position and
    whether it is real (padding is never attended to). Forwards read it; they append to it only the
    new tokens they are told to store."""

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.positions: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.valid is None else self.valid.shape[1]

    def next_positions(self, batch: int, device: torch.device) -> torch.Tensor:
        """Per row, the position the next real token takes (real cached tokens so far)."""
        if self.valid is None:
            return torch.zeros(batch, dtype=torch.long, device=device)
        return self.valid.sum(-1)

    def extend(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, store: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys = k if self.keys[layer] is None else torch.cat([self.keys[layer], k], dim=2)
        values = v if self.values[layer] is None else torch.cat([self.values[layer], v], dim=2)
        if store:
            keep = self.get_seq_length() + store
            self.keys[layer], self.values[layer] = keys[:, :, :keep], values[:, :, :keep]
        return keys, values

    def commit(self, positions: torch.Tensor, valid: torch.Tensor, store: int) -> None:
        """After every layer has extended: record the stored tokens' positions and validity."""
        if not store:
            return
        if self.valid is None:
            self.positions, self.valid = positions[:, :store], valid[:, :store]
        else:
            self.positions = torch.cat([self.positions, positions[:, :store]], dim=1)
            self.valid = torch.cat([self.valid, valid[:, :store]], dim=1)


class SDARRMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_tables(
    positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` ``[b, 1, n, head_dim]`` for integer positions ``[b, n]`` (computed per call: no
    buffer that a meta-device load could leave empty)."""
    exponent = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (base**exponent)
    freqs = positions.float()[..., None] * inv_freq
    angles = torch.cat([freqs, freqs], dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class SDARAttention(nn.Module):
    def __init__(self, config: SDARConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        bias = bool(config.attention_bias)
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        if getattr(config, "qk_norm", True):
            self.q_norm = SDARRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = SDARRMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        cache: SDARCache | None,
        store: int,
    ) -> torch.Tensor:
        b, n, _ = hidden.shape
        q = self.q_proj(hidden).view(b, n, self.num_heads, self.head_dim)
        k = self.k_proj(hidden).view(b, n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q.transpose(1, 2), cos, sin)
        k = apply_rotary(k.transpose(1, 2), cos, sin)
        if cache is not None:
            k, v = cache.extend(self.layer_idx, k, v, store)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class SDARMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SDARDecoderLayer(nn.Module):
    def __init__(self, config: SDARConfig, layer_idx: int, mlp: nn.Module) -> None:
        super().__init__()
        self.self_attn = SDARAttention(config, layer_idx)
        self.mlp = mlp
        self.input_layernorm = SDARRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = SDARRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden, cos, sin, mask, cache, store) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, mask, cache, store)
        out = self.mlp(self.post_attention_layernorm(hidden))
        router_logits = None
        if isinstance(out, tuple):  # a mixture of experts also returns its router logits
            out, router_logits = out
        return hidden + out, router_logits


def block_causal_mask(
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    key_valid: torch.Tensor,
    block_size: int,
    causal: bool = False,
    denoising: int = 0,
) -> torch.Tensor:
    """``[b, 1, n, S + n]``: a query sees real keys of its own and earlier blocks (the last ``n`` keys
    are the queries themselves; each sees itself so padded queries stay finite). With ``causal``, the
    clean queries (all but the last ``denoising``, the block being denoised) see only keys at or
    before their own position; the block being denoised always sees its whole block."""
    n = query_positions.shape[1]
    allowed = (key_positions // block_size)[:, None, :] <= (query_positions // block_size)[:, :, None]
    if causal:
        token_causal = key_positions[:, None, :] <= query_positions[:, :, None]
        clean = (torch.arange(n, device=allowed.device) < n - denoising)[None, :, None]
        allowed = torch.where(clean, token_causal, allowed)
    allowed = allowed & key_valid[:, None, :]
    eye = torch.eye(n, dtype=torch.bool, device=allowed.device)
    allowed[:, :, -n:] |= eye
    return allowed[:, None]


def positions_in_document(document_ids: torch.Tensor) -> torch.Tensor:
    """Each token's position ``[b, L]`` counted from the first token of its document."""
    idx = torch.arange(document_ids.shape[1], device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return idx - torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values


def training_mask(document_ids: torch.Tensor, blocks: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """``[b, 1, 2L, 2L]`` SDAR training mask over ``[x_t ; x_0]``: never across documents; noised
    sees its own block (both ways) and earlier clean blocks; clean sees its own and earlier clean
    blocks (``causal``: only clean tokens at or before itself); clean never sees noised."""
    b, length = document_ids.shape
    doc = torch.cat([document_ids, document_ids], dim=1)
    blk = torch.cat([blocks, blocks], dim=1)
    clean = torch.arange(2 * length, device=doc.device) >= length
    qc, kc = clean[:, None], clean[None, :]
    qb, kb = blk[:, :, None], blk[:, None, :]
    same_doc = doc[:, :, None] == doc[:, None, :]
    noised_noised = ~qc & ~kc & (qb == kb)
    noised_clean = ~qc & kc & (kb < qb)
    if causal:
        idx = torch.arange(length, device=doc.device).repeat(2)
        clean_clean = qc & kc & (idx[None, :] <= idx[:, None])
    else:
        clean_clean = qc & kc & (kb <= qb)
    return (same_doc & (noised_noised | noised_clean | clean_clean))[:, None]


class SDARPreTrainedModel(PreTrainedModel):
    config_class = SDARConfig
    base_model_prefix = "model"
    _no_split_modules = ["SDARDecoderLayer"]
    _supports_sdpa = True
    supports_gradient_checkpointing = False

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            _init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                _init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            _init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, SDARRMSNorm):
            _init.ones_(module.weight)


class SDARModel(SDARPreTrainedModel):
    """The decoder: embeddings, layers, final norm."""

    def __init__(self, config: SDARConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            SDARDecoderLayer(config, i, self.make_mlp(config, i)) for i in range(config.num_hidden_layers)
        )
        self.norm = SDARRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def make_mlp(self, config: SDARConfig, layer_idx: int) -> nn.Module:
        return SDARMLP(config.hidden_size, config.intermediate_size)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: SDARCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        store_kv: bool | int | None = None,
        training_layout: bool = False,
        document_ids: torch.Tensor | None = None,
        denoising: int = 0,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if past_key_values is None:  # transformers 5 calls it ``cache``
            past_key_values = kwargs.get("cache")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, n = hidden.shape[:2]
        block = self.config.block_size
        causal = getattr(self.config, "clean_attention", "block_causal") == "causal"
        if not 0 <= denoising <= n:
            raise ValueError(f"denoising={denoising}: at most the {n} new tokens can be denoised")
        cache, store = None, 0
        if training_layout:
            if past_key_values is not None or use_cache:
                raise ValueError("the training layout runs without a KV cache")
            if n % 2:
                raise ValueError(f"the training layout is [x_t ; x_0]: an even length, got {n}")
            length = n // 2
            doc = torch.zeros(b, length, dtype=torch.long, device=hidden.device)
            if document_ids is not None:
                doc = document_ids.to(device=hidden.device, dtype=torch.long)
            if attention_mask is not None:  # padding forms its own document
                doc = torch.where(attention_mask[:, -length:].bool(), doc, torch.full_like(doc, -1))
            in_doc = positions_in_document(doc)
            positions = in_doc if position_ids is None else position_ids[:, -length:]
            mask = training_mask(doc, in_doc // block, causal)
            positions = torch.cat([positions, positions], dim=1)
        else:
            if use_cache and past_key_values is None:
                past_key_values = SDARCache(self.config.num_hidden_layers)
            cache = past_key_values
            if store_kv is None:
                store_kv = bool(use_cache)
            store = n if store_kv is True else int(store_kv or 0)
            if not 0 <= store <= n:
                raise ValueError(f"store_kv={store_kv}: at most the {n} new tokens can be stored")
            if cache is None and store:
                cache = past_key_values = SDARCache(self.config.num_hidden_layers)
            valid = torch.ones(b, n, dtype=torch.bool, device=hidden.device)
            if attention_mask is not None:
                valid = attention_mask[:, -n:].to(device=hidden.device).bool()
            if position_ids is None:  # continue from the cache's real tokens
                start = cache.next_positions(b, hidden.device)[:, None] if cache is not None else 0
                position_ids = (start + valid.long().cumsum(-1) - 1).clamp_min(0)
            positions = position_ids.to(hidden.device)
            key_positions, key_valid = positions, valid
            if cache is not None and cache.valid is not None:
                key_positions = torch.cat([cache.positions, positions], dim=1)
                key_valid = torch.cat([cache.valid, valid], dim=1)
            mask = block_causal_mask(positions, key_positions, key_valid, block, causal, denoising)
        cos, sin = rotary_tables(
            positions, self.layers[0].self_attn.head_dim, self.config.rope_theta, hidden.dtype
        )
        router_logits = []
        for layer in self.layers:
            hidden, logits = layer(hidden, cos, sin, mask, cache, store)
            if logits is not None:
                router_logits.append(logits)
        if cache is not None:
            cache.commit(positions, valid, store)
        hidden = self.norm(hidden)
        if router_logits:
            return MoeModelOutputWithPast(
                last_hidden_state=hidden, router_logits=tuple(router_logits), **{CACHE_FIELD: past_key_values}
            )
        return BaseModelOutputWithPast(last_hidden_state=hidden, **{CACHE_FIELD: past_key_values})


@dataclass
class SDARGenerateOutput(ModelOutput):
    """``sequences``: the prompts followed by the generated tokens (``pad_token_id`` after a stop);
    the forward counts give tokens per forward (TPF)."""

    sequences: torch.LongTensor | None = None
    denoise_forwards: int | None = None
    commit_forwards: int | None = None
    tokens_per_forward: float | None = None


class SDARForCausalLM(SDARPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    base_model_class = SDARModel

    def __init__(self, config: SDARConfig) -> None:
        super().__init__(config)
        self.model = self.base_model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def get_decoder(self) -> SDARModel:
        return self.model

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: SDARCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        store_kv: bool | int | None = None,
        training_layout: bool = False,
        document_ids: torch.Tensor | None = None,
        loss_weights: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        denoising: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if past_key_values is None:
            past_key_values = kwargs.get("cache")
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            store_kv=store_kv, training_layout=training_layout, document_ids=document_ids,
            denoising=denoising,
        )  # fmt: skip
        hidden = out.last_hidden_state
        if training_layout:  # only the noised half predicts anything
            hidden = hidden[:, : hidden.shape[1] // 2]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.diffusion_loss(logits, labels, loss_weights, num_items_in_batch)
        cache = getattr(out, CACHE_FIELD)
        result = CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})
        return self._with_router_outputs(result, out, loss)

    def _with_router_outputs(self, result, out, loss):
        return result

    @staticmethod
    def diffusion_loss(
        logits: torch.Tensor,
        labels: torch.Tensor,
        loss_weights: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``sum(weight * CE(logits_i, labels_i)) / N`` over supervised positions (labels != -100),
        with no shift: position i predicts the clean token at i."""
        flat = logits.float().reshape(-1, logits.shape[-1])
        ce = F.cross_entropy(flat, labels.reshape(-1).to(flat.device), ignore_index=-100, reduction="none")
        if loss_weights is not None:
            ce = ce * loss_weights.reshape(-1).to(ce)
        denominator = num_items_in_batch
        if denominator is None:
            denominator = (labels != -100).sum().clamp_min(1)
        return ce.sum() / denominator

    # ------------------------------------------------------------------ block-diffusion decoding
    def _default(self, name: str, value, fallback):
        if value is not None:
            return value
        for source in (getattr(self, "generation_config", None), self.config):
            found = getattr(source, name, None) if source is not None else None
            if found is not None:
                return found
        return fallback

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int | None = None,
        block_size: int | None = None,
        mask_token_id: int | None = None,
        remasking_strategy: str | None = None,
        confidence_threshold: float | None = None,
        denoising_steps: int | None = None,
        min_tokens_per_step: int = 1,
        entropy_bound: float = 0.5,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        seed: int = 0,
        fold_commit: bool = True,
        return_dict_in_generate: bool = False,
        **kwargs,
    ) -> torch.LongTensor | SDARGenerateOutput:
        """Decode ``max_new_tokens`` after each prompt (or until an end token), ``block_size`` at a time.

        Each block starts as mask tokens; every denoising forward reads the cache (not writing it)
        and finalises masked positions by ``remasking_strategy``: ``low_confidence_dynamic`` (all
        whose confidence exceeds ``confidence_threshold``, at least ``min_tokens_per_step``; a
        threshold of 1.0 is static one-per-step decoding), ``low_confidence_static`` (the most
        confident, spread evenly over ``denoising_steps`` forwards), ``sequential`` (left to right)
        or ``entropy_bounded`` (lowest entropy first while the sum stays within ``entropy_bound``).
        A finished block's keys and values are written by the next block's first forward
        (``fold_commit``, exact) or by a pass of its own. Sampling (``temperature`` > 0, ``top_k``,
        ``top_p``) draws from a generator seeded with ``seed``. Left-padded batches
        (``attention_mask``) decode as their rows would alone.
        """
        unknown = {k: v for k, v in kwargs.items() if v is not None and k not in ("use_cache", "num_beams")}
        if unknown or kwargs.get("num_beams", 1) not in (None, 1):
            raise TypeError(f"SDAR generate does not take {sorted(unknown) or ['num_beams > 1']}")
        if input_ids is None:
            raise ValueError("generate needs input_ids")
        block_size = int(self._default("block_size", block_size, 4))
        mask_token_id = int(self._default("mask_token_id", mask_token_id, -1))
        max_new_tokens = int(self._default("max_new_tokens", max_new_tokens, 128))
        strategy = self._default("remasking_strategy", remasking_strategy, "low_confidence_dynamic")
        tau = float(self._default("confidence_threshold", confidence_threshold, 0.9))
        steps = self._default("denoising_steps", denoising_steps, None)
        sample = bool(self._default("do_sample", do_sample, False))
        temperature = float(self._default("temperature", temperature, 1.0)) if sample else 0.0
        top_k = int(self._default("top_k", top_k, 0) or 0) if sample else 0
        top_p = float(self._default("top_p", top_p, 1.0) or 1.0) if sample else 1.0
        eos = self._default("eos_token_id", eos_token_id, None)
        stops = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        pad = self._default("pad_token_id", pad_token_id, None)
        pad = int(pad) if pad is not None else (stops[0] if stops else 0)
        if strategy not in STRATEGIES:
            raise ValueError(f"remasking_strategy {strategy!r} is not one of {STRATEGIES}")
        if block_size < 1 or max_new_tokens < 1:
            raise ValueError("block_size and max_new_tokens must be >= 1")
        if not 0 <= mask_token_id < self.config.vocab_size:
            raise ValueError("no mask token: set mask_token_id in config.json or pass it")
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"confidence_threshold must be in [0, 1], got {tau}")
        if steps is not None and int(steps) < 1:
            raise ValueError(f"denoising_steps must be >= 1, got {steps}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        prompts = [row[keep.bool()].tolist() for row, keep in zip(input_ids, attention_mask)]
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if mask_token_id in p or min(p) < 0 or max(p) >= self.config.vocab_size:
                raise ValueError(f"prompt {i} holds the mask token or ids outside the vocabulary")
        tokens, counts = self._decode_blocks(
            prompts, block_size, mask_token_id, max_new_tokens, strategy, tau, int(steps or block_size),
            min_tokens_per_step, entropy_bound, temperature, top_k, top_p, stops, pad, seed, fold_commit,
        )  # fmt: skip
        out = torch.full((len(prompts), max_new_tokens), pad, dtype=input_ids.dtype, device=input_ids.device)
        for r, t in enumerate(tokens):
            out[r, : len(t)] = torch.tensor(t, dtype=input_ids.dtype)
        sequences = torch.cat([input_ids, out], dim=1)
        if not return_dict_in_generate:
            return sequences
        generated = sum(len(t) for t in tokens)
        return SDARGenerateOutput(
            sequences=sequences, denoise_forwards=counts["denoise"], commit_forwards=counts["commit"],
            tokens_per_forward=generated / max(1, counts["row_forwards"]),
        )  # fmt: skip

    def _decode_blocks(
        self, prompts, block, mask_id, max_new, strategy, tau, steps, min_per_step, entropy_bound,
        temperature, top_k, top_p, stops, pad, seed, fold_commit,
    ):  # fmt: skip
        device = self.lm_head.weight.device
        gen = torch.Generator(device=device).manual_seed(seed)
        b, B = len(prompts), block
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        prompt_blocks = (lengths + B - 1) // B
        nb = int(prompt_blocks.max())
        pads = (nb - prompt_blocks) * B  # left padding by whole blocks keeps rows' blocks aligned
        total_blocks = nb + math.ceil((max_new + B - 1) / B)
        frame = torch.full((b, total_blocks * B), pad, dtype=torch.long, device=device)
        for r, p in enumerate(prompts):
            frame[r, int(pads[r]) : int(pads[r]) + len(p)] = torch.tensor(p, device=device)
        idx = torch.arange(frame.shape[1], device=device)
        positions = (idx[None, :] - pads[:, None]).clamp_min(0)
        real = idx[None, :] >= pads[:, None]
        prompt_end = pads + lengths
        returned_end = prompt_end + max_new  # first position not returned
        decode_end = (returned_end + B - 1) // B * B  # a last block that max_new ends inside is decoded whole
        cache = SDARCache(self.config.num_hidden_layers)
        counts = {"denoise": 0, "commit": 0, "row_forwards": 0}
        if nb > 1:  # prefill the blocks every prompt fills completely
            n = (nb - 1) * B
            self(frame[:, :n], attention_mask=real[:, :n], position_ids=positions[:, :n],
                 past_key_values=cache, store_kv=n)  # fmt: skip
        finished = torch.zeros(b, dtype=torch.bool, device=device)
        stop_ids = torch.tensor(stops, device=device) if stops else None
        pending = None  # a finished block whose keys and values are not cached yet
        for k in range(nb - 1, total_blocks):
            cols = slice(k * B, (k + 1) * B)
            tokens = frame[:, cols].clone()
            at = idx[cols][None, :]
            here = (at >= prompt_end[:, None]) & (at < decode_end[:, None])
            returned = here & (at < returned_end[:, None])  # the rest is masked too, then cut
            masked = here & ~finished[:, None]
            tokens[masked] = mask_id
            tokens[here & finished[:, None]] = pad
            valid, pos = real[:, cols], positions[:, cols]
            at_start = masked.sum(-1)
            step = 0
            if pending is not None and not bool((masked & returned).any()):
                self(pending[0], attention_mask=pending[2], position_ids=pending[1], past_key_values=cache,
                     store_kv=B)  # fmt: skip
                counts["commit"] += 1
                pending = None
            while (masked & returned).any():  # stops once every returned position is final
                if pending is not None:
                    logits = self(
                        torch.cat([pending[0], tokens], 1), attention_mask=torch.cat([pending[2], valid], 1),
                        position_ids=torch.cat([pending[1], pos], 1), past_key_values=cache, store_kv=B,
                        denoising=B,
                    ).logits[:, B:]  # fmt: skip
                    pending = None
                else:
                    logits = self(tokens, attention_mask=valid, position_ids=pos, past_key_values=cache,
                                  store_kv=0, denoising=B).logits  # fmt: skip
                counts["denoise"] += 1
                counts["row_forwards"] += int((masked & returned).any(-1).sum())
                logits = logits.float()
                logits[..., mask_id] = float("-inf")
                chosen, confidence, entropy = _choose_tokens(logits, temperature, top_k, top_p, gen)
                quota = (at_start // steps + (step < at_start % steps).long()).clamp_min(1)
                take = _select(strategy, masked, confidence, entropy, quota, tau, min_per_step, entropy_bound)
                tokens[take] = chosen[take]
                masked &= ~take
                step += 1
            frame[:, cols] = tokens
            if stop_ids is not None:
                finished |= (torch.isin(tokens, stop_ids) & returned & ~finished[:, None]).any(-1)
            finished |= returned_end <= (k + 1) * B
            if bool(finished.all()):
                break
            if fold_commit:
                pending = (tokens, pos, valid)
            else:
                self(tokens, attention_mask=valid, position_ids=pos, past_key_values=cache, store_kv=B)
                counts["commit"] += 1
        out = []
        for r in range(b):
            row = frame[r, int(prompt_end[r]) : int(prompt_end[r]) + max_new].tolist()
            for i, t in enumerate(row):
                if t in stops:
                    row = row[: i + 1]
                    break
            out.append(row)
        return out, counts


def _choose_tokens(logits, temperature, top_k, top_p, generator):
    """``(tokens, confidence, entropy)``: greedy or sampled tokens, the chosen token's probability,
    and the entropy of the distribution it came from."""
    if temperature == 0.0:
        probs = logits.softmax(-1)
        tokens = probs.argmax(-1)
    else:
        scaled = logits / temperature
        if top_k and top_k < scaled.shape[-1]:
            kth = torch.topk(scaled, top_k, dim=-1).values[..., -1:]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        if top_p < 1.0:
            ordered, order = torch.sort(scaled, dim=-1, descending=True)
            p = ordered.softmax(-1)
            ordered = ordered.masked_fill(p.cumsum(-1) - p >= top_p, float("-inf"))
            scaled = torch.full_like(scaled, float("-inf")).scatter(-1, order, ordered)
        probs = scaled.softmax(-1)
        tokens = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
        tokens = tokens.reshape(probs.shape[:-1])
    confidence = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
    return tokens, confidence, entropy


def _select(strategy, masked, confidence, entropy, quota, tau, min_per_step, entropy_bound):
    """Boolean ``[b, B]``: the masked positions to finalise after this forward."""
    b, n = masked.shape
    if strategy == "sequential":
        key = -torch.arange(n, device=masked.device, dtype=torch.float32).expand(b, n)
    elif strategy == "entropy_bounded":
        key = -entropy.float()
    else:
        key = confidence.float()
    ranked = torch.argsort(key.masked_fill(~masked, float("-inf")), dim=-1, descending=True)
    rank = torch.empty_like(ranked).scatter_(-1, ranked, torch.arange(n, device=masked.device).expand(b, n))
    if strategy in ("sequential", "low_confidence_static"):
        take = rank < quota.unsqueeze(-1)
    elif strategy == "low_confidence_dynamic":
        take = (confidence > tau) | (rank < min_per_step)
    else:
        ordered = entropy.float().gather(-1, ranked).masked_fill(~masked.gather(-1, ranked), 0.0)
        within = ordered.cumsum(-1) <= entropy_bound
        within[:, 0] = True
        take = within.gather(-1, rank)
    return take & masked
