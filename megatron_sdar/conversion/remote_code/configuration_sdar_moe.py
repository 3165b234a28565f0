"""Configuration of an SDAR mixture-of-experts model (a Qwen3-MoE-shaped decoder).

Every layer's MLP is a routed MoE of ``num_experts`` SwiGLU experts of width
``moe_intermediate_size``, ``num_experts_per_tok`` of them per token, without shared experts
(``decoder_sparse_step`` 1, no ``mlp_only_layers``). ``norm_topk_prob`` renormalises the chosen
experts' probabilities to sum to one.
"""

from __future__ import annotations

from .configuration_sdar import SDARConfig


class SDARMoeConfig(SDARConfig):
    model_type = "sdar_moe"

    def __init__(
        self,
        num_experts: int = 128,
        num_experts_per_tok: int = 8,
        moe_intermediate_size: int = 768,
        norm_topk_prob: bool = True,
        router_aux_loss_coef: float = 0.001,
        output_router_logits: bool = False,
        decoder_sparse_step: int = 1,
        mlp_only_layers: list[int] | None = None,
        **kwargs,
    ) -> None:
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size
        self.norm_topk_prob = norm_topk_prob
        self.router_aux_loss_coef = router_aux_loss_coef
        self.output_router_logits = output_router_logits
        self.decoder_sparse_step = decoder_sparse_step
        self.mlp_only_layers = [] if mlp_only_layers is None else list(mlp_only_layers)
        super().__init__(**kwargs)
