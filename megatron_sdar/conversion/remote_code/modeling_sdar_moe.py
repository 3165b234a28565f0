"""SDAR mixture-of-experts model for transformers (remote code shipped with the weights).

The dense SDAR model (``modeling_sdar.py``: masks, cache, training layout, block-diffusion
``generate``) with each layer's MLP replaced by a routed mixture of SwiGLU experts as Qwen3-MoE
has it: a linear router, softmax over the experts, the top ``num_experts_per_tok`` per token
(their probabilities renormalised when ``norm_topk_prob``), no shared experts. With
``output_router_logits`` and labels, the load-balancing loss times ``router_aux_loss_coef`` is
added to the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from .configuration_sdar_moe import SDARMoeConfig
from .modeling_sdar import CACHE_FIELD, SDARMLP, SDARForCausalLM, SDARModel, SDARPreTrainedModel


class SDARMoeSparseBlock(nn.Module):
    def __init__(self, config: SDARMoeConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            SDARMLP(config.hidden_size, config.moe_intermediate_size) for _ in range(config.num_experts)
        )

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = hidden.shape
        flat = hidden.reshape(-1, shape[-1])
        router_logits = self.gate(flat)
        probs = router_logits.float().softmax(-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights.to(flat.dtype)
        out = torch.zeros_like(flat)
        for expert in torch.unique(chosen).tolist():
            rows, slot = torch.nonzero(chosen == expert, as_tuple=True)
            out.index_add_(0, rows, self.experts[expert](flat[rows]) * weights[rows, slot, None])
        return out.reshape(shape), router_logits


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int
) -> torch.Tensor:
    """Switch-style auxiliary loss over all layers' router logits: the fraction of tokens routed to
    each expert times its mean router probability, summed, times the number of experts."""
    logits = torch.cat([g.float() for g in router_logits], dim=0)
    probs = logits.softmax(-1)
    chosen = torch.topk(probs, top_k, dim=-1).indices
    routed = F.one_hot(chosen, num_experts).float().mean(0)  # [top_k, experts]
    return (routed * probs.mean(0)[None]).sum() * num_experts


class SDARMoePreTrainedModel(SDARPreTrainedModel):
    config_class = SDARMoeConfig


class SDARMoeModel(SDARMoePreTrainedModel, SDARModel):
    def make_mlp(self, config: SDARMoeConfig, layer_idx: int) -> nn.Module:
        if config.mlp_only_layers or config.decoder_sparse_step != 1:
            raise ValueError(
                "dense layers between MoE layers (mlp_only_layers, decoder_sparse_step) are not supported"
            )
        return SDARMoeSparseBlock(config)


class SDARMoeForCausalLM(SDARMoePreTrainedModel, SDARForCausalLM):
    base_model_class = SDARMoeModel

    def _with_router_outputs(self, result, out, loss):
        router_logits = getattr(out, "router_logits", None)
        aux = None
        if router_logits and self.config.output_router_logits:
            aux = load_balancing_loss(router_logits, self.config.num_experts, self.config.num_experts_per_tok)
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux.to(loss.device)
        return MoeCausalLMOutputWithPast(
            loss=loss, aux_loss=aux, logits=result.logits, **{CACHE_FIELD: getattr(result, CACHE_FIELD)},
            router_logits=router_logits if self.config.output_router_logits else None,
        )  # fmt: skip
