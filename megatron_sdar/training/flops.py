"""An honest FLOP count for SDAR and AR training steps (model FLOPs utilisation).

Counted, for forward plus backward (3x the forward's matrix products):

* the transformer body on every *processed* token (2L per window for SDAR: the noised and the clean
  copy; L for AR): QKV and output projections, the MLP (gated or not; for MoE the routed experts a
  token visits plus the router and shared experts);
* attention scores and the value product over *allowed* (query, key) entries only, counted exactly
  from the layout tensor for the SDAR mask (a causal mask over L tokens for AR), not over the full
  square the kernel may visit;
* the output layer only where it runs (the noised half for SDAR, or its masked tokens when the
  output layer runs on those only; with the joint AR loss also the clean half, or its positions with
  a next-token target; every token for AR).

Embedding lookups, norms, activations, softmax and the loss are left out (they are not matrix work).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_sdar.masks import LAYOUT_BLOCK, LAYOUT_DOC, CleanAttention

FORWARD_BACKWARD = 3  # backward does two products for each one of the forward


@dataclass(frozen=True)
class ModelShape:
    """The sizes that determine a step's matrix work."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    ffn_hidden_size: int
    vocab_size: int
    gated_linear_unit: bool = True
    num_moe_experts: int | None = None
    moe_router_topk: int = 1
    moe_ffn_hidden_size: int | None = None
    moe_shared_expert_intermediate_size: int | None = None

    @classmethod
    def from_config(cls, config, vocab_size: int) -> ModelShape:
        """From a Megatron ``TransformerConfig``."""
        return cls(
            num_layers=config.num_layers,
            hidden_size=config.hidden_size,
            num_attention_heads=config.num_attention_heads,
            num_query_groups=config.num_query_groups or config.num_attention_heads,
            kv_channels=config.kv_channels,
            ffn_hidden_size=config.ffn_hidden_size,
            vocab_size=vocab_size,
            gated_linear_unit=config.gated_linear_unit,
            num_moe_experts=config.num_moe_experts,
            moe_router_topk=config.moe_router_topk,
            moe_ffn_hidden_size=config.moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size=config.moe_shared_expert_intermediate_size,
        )

    def body_flops_per_token(self) -> int:
        """Forward matrix FLOPs of all layers for one token, attention scores excluded."""
        h = self.hidden_size
        q = self.num_attention_heads * self.kv_channels
        kv = self.num_query_groups * self.kv_channels
        attention = 2 * h * (q + 2 * kv) + 2 * q * h
        mats = 3 if self.gated_linear_unit else 2
        if self.num_moe_experts:
            ffn = self.moe_ffn_hidden_size or self.ffn_hidden_size
            mlp = self.moe_router_topk * 2 * mats * h * ffn + 2 * h * self.num_moe_experts
            if self.moe_shared_expert_intermediate_size:
                mlp += 2 * mats * h * self.moe_shared_expert_intermediate_size
        else:
            mlp = 2 * mats * h * self.ffn_hidden_size
        return self.num_layers * (attention + mlp)

    def attention_flops_per_entry(self) -> int:
        """Forward FLOPs of all layers for one allowed (query, key) entry: ``QK^T`` and ``PV``."""
        return self.num_layers * 2 * 2 * self.num_attention_heads * self.kv_channels

    def output_flops_per_token(self) -> int:
        return 2 * self.hidden_size * self.vocab_size


def sdar_attention_entries(layout: torch.Tensor, clean_attention: CleanAttention | str) -> int:
    """Allowed entries of the ``2L x 2L`` SDAR mask, summed over the batch, without building it.

    Tokens of one (document, block) pair are contiguous; a run of ``s`` of them preceded by ``p``
    tokens of its document gives ``s * (s + p)`` noised->{noised, clean} entries, and as many
    clean->clean entries under the block-causal rule (``sum over k of (k + 1)`` per document under
    the token-causal one).
    """
    clean_attention = CleanAttention(clean_attention)
    layout = layout.detach().to("cpu", torch.int64)
    seq_len = layout.shape[-1]
    total = 0
    for row in layout:
        docs, blocks = row[LAYOUT_DOC], row[LAYOUT_BLOCK]
        key = docs * (seq_len + 1) + blocks
        run_start = torch.ones(seq_len, dtype=torch.bool)
        run_start[1:] = key[1:] != key[:-1]
        starts = torch.nonzero(run_start).flatten()
        sizes = torch.diff(starts, append=torch.tensor([seq_len]))
        run_docs = docs[starts]
        new_doc = torch.ones_like(run_docs, dtype=torch.bool)
        new_doc[1:] = run_docs[1:] != run_docs[:-1]
        doc_start = torch.cummax(torch.where(new_doc, starts, torch.zeros_like(starts)), 0).values
        before = starts - doc_start  # tokens of the same document before the run
        noised = int((sizes * (sizes + before)).sum())
        if clean_attention is CleanAttention.BLOCK_CAUSAL:
            clean = noised
        else:
            _, doc_sizes = torch.unique_consecutive(docs, return_counts=True)
            clean = int((doc_sizes * (doc_sizes + 1) // 2).sum())
        total += noised + clean
    return total


def causal_attention_entries(batch: int, seq_len: int) -> int:
    """Allowed entries of a causal mask over ``seq_len`` tokens, summed over ``batch`` rows."""
    return batch * seq_len * (seq_len + 1) // 2


def sdar_step_flops(
    shape: ModelShape,
    layout: torch.Tensor,
    clean_attention: CleanAttention | str,
    output_tokens: int | None = None,
    ar_output_tokens: int = 0,
) -> int:
    """Forward+backward FLOPs of one SDAR micro-batch with this ``[b, 2, L]`` layout; the output
    layer runs on ``output_tokens`` noised positions (default: the whole noised half, ``b x L``) and,
    with the joint AR loss, on ``ar_output_tokens`` clean ones (``b x L``, or the number of
    next-token targets when the output layer runs on those only)."""
    batch, _, seq_len = layout.shape
    if output_tokens is None:
        output_tokens = batch * seq_len
    forward = (
        2 * batch * seq_len * shape.body_flops_per_token()
        + sdar_attention_entries(layout, clean_attention) * shape.attention_flops_per_entry()
        + (output_tokens + ar_output_tokens) * shape.output_flops_per_token()
    )
    return FORWARD_BACKWARD * forward


def ar_step_flops(shape: ModelShape, batch: int, seq_len: int) -> int:
    """Forward+backward FLOPs of one causal-LM micro-batch of ``batch`` windows of ``seq_len``."""
    forward = (
        batch * seq_len * (shape.body_flops_per_token() + shape.output_flops_per_token())
        + causal_attention_entries(batch, seq_len) * shape.attention_flops_per_entry()
    )
    return FORWARD_BACKWARD * forward
