"""The SDAR model: Megatron-Core's ``GPTModel`` with SDAR attention, positions and output.

Composition, not patching:

* the layer spec is Megatron's own (local or Transformer Engine) with its ``core_attention``
  replaced by :class:`~megatron_sdar.attention.SDARCoreAttention` (:func:`sdar_layer_spec`);
* :class:`SDARModel` subclasses ``GPTModel`` to compute RoPE from explicit position ids (the noised
  copy gets the clean copy's positions) and to run the output layer and the vocab-parallel
  cross-entropy on the noised half only, or only on its masked positions (``loss_index``), which is
  all the loss needs.
"""

from __future__ import annotations

import copy
import dataclasses
from functools import partial
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_sdar.attention import CausalCoreAttention, SDARCoreAttention
from megatron_sdar.config import SDARConfig
from megatron_sdar.positions import PositionRotaryEmbedding


def with_sdar_core_attention(spec: Any, sdar: SDARConfig) -> Any:
    """A copy of a layer or decoder-block spec whose self-attention uses SDAR core attention."""
    builder = partial(
        SDARCoreAttention, clean_attention=sdar.clean_attention, backend=sdar.attention_backend,
        kernel_options=sdar.flex_kernel_options,
    )  # fmt: skip
    return with_core_attention(spec, builder)


def with_core_attention(spec: Any, builder: Any) -> Any:
    """A copy of a layer or decoder-block spec whose self-attention core is ``builder``."""
    spec = copy.deepcopy(spec)

    def patch_layer(layer_spec: ModuleSpec) -> None:
        attn = getattr(layer_spec.submodules, "self_attention", None)
        subs = getattr(attn, "submodules", None)
        if subs is None or not hasattr(subs, "core_attention"):
            raise ValueError(f"layer spec {layer_spec.module} has no self-attention core to replace")
        subs.core_attention = builder

    if isinstance(spec, TransformerBlockSubmodules):
        for layer_spec in spec.layer_specs:
            patch_layer(layer_spec)
    elif isinstance(spec, ModuleSpec) and isinstance(spec.submodules, TransformerBlockSubmodules):
        for layer_spec in spec.submodules.layer_specs:
            patch_layer(layer_spec)
    else:
        patch_layer(spec)
    return spec


def sdar_layer_spec(
    config: TransformerConfig,
    sdar: SDARConfig,
    use_transformer_engine: bool = False,
    vp_stage: int | None = None,
) -> Any:
    """Megatron's GPT layer spec for ``config`` (dense; MoE through the decoder-block spec) with SDAR
    core attention. On the local spec without Apex the norms are :class:`~megatron_sdar.norms.TorchNorm`
    (compiled on CUDA; Megatron's torch norm is eager and refuses sequence parallelism)."""
    return _layer_spec(
        config, use_transformer_engine, vp_stage, lambda base: with_sdar_core_attention(base, sdar)
    )


def ar_layer_spec(
    config: TransformerConfig, use_transformer_engine: bool = False, vp_stage: int | None = None
) -> Any:
    """The same architecture for the causal-LM objective (the AR baseline, ``--sdar-objective ar``).

    Transformer Engine's spec keeps its fused attention; the local spec gets
    :class:`~megatron_sdar.attention.CausalCoreAttention` (flash SDPA) instead of Megatron's
    score-materialising ``DotProductAttention``, so both objectives run comparable kernels.
    """
    attend = (
        (lambda base: base)
        if use_transformer_engine
        else partial(with_core_attention, builder=CausalCoreAttention)
    )
    return _layer_spec(config, use_transformer_engine, vp_stage, attend)


def _layer_spec(
    config: TransformerConfig, use_transformer_engine: bool, vp_stage: int | None, attend: Any
) -> Any:
    if config.num_moe_experts:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

        base = get_gpt_decoder_block_spec(
            config, use_transformer_engine=use_transformer_engine, normalization=config.normalization,
            vp_stage=vp_stage,
        )  # fmt: skip
    elif use_transformer_engine:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        base = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    else:
        base = get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm, normalization=config.normalization)
    spec = attend(base)
    if not use_transformer_engine and not _have_apex():
        spec = _with_torch_norms(config, spec, vp_stage)
    return spec


def _have_apex() -> bool:
    try:
        import apex  # noqa: F401
    except ImportError:
        return False
    return True


def _with_torch_norms(config: TransformerConfig, spec: Any, vp_stage: int | None) -> Any:
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    from megatron_sdar.norms import TorchNorm as Norm

    if isinstance(spec, ModuleSpec) and isinstance(spec.submodules, TransformerBlockSubmodules):
        spec = spec.submodules
    if isinstance(spec, TransformerBlockSubmodules):
        layers = spec.layer_specs
    else:
        layers = [spec] * get_num_layers_to_build(config, vp_stage)
    patched = []
    for layer in layers:
        layer = copy.deepcopy(layer)
        subs = layer.submodules
        for name in ("input_layernorm", "pre_mlp_layernorm"):
            if getattr(subs, name, None) not in (None, IdentityOp):
                setattr(subs, name, Norm)
        attn = getattr(subs.self_attention, "submodules", None)
        for name in ("q_layernorm", "k_layernorm"):
            if getattr(attn, name, None) not in (None, IdentityOp):
                setattr(attn, name, Norm)
        patched.append(layer)
    return TransformerBlockSubmodules(layer_specs=patched, layer_norm=Norm)


class RoPEInCoreModel(GPTModel):
    """``GPTModel`` whose core attentions apply RoPE themselves, from positions the model hands them
    through ``attention_mask`` (one compiled kernel each way on CUDA, tables built once per
    micro-batch); Megatron's attention gets no rotary embedding, which it fuses only with TE.

    Subclasses name the core attention type that accepts the positions (``use_rotary``);
    ``_rope_in_core`` records whether this stage holds any such layer.
    """

    core_attention_type: type
    description: str

    def __init__(
        self,
        config: TransformerConfig,
        transformer_layer_spec: Any,
        vocab_size: int,
        max_sequence_length: int,
        rotary_base: float = 10000.0,
        rotary_percent: float = 1.0,
        **kwargs: Any,
    ) -> None:
        if kwargs.pop("position_embedding_type", "rope") != "rope":
            raise ValueError(f"{self.description} uses rotary position embeddings only")
        # The parent builds no rotary module: positions come from explicit ids (PositionRotaryEmbedding).
        super().__init__(
            config=config,
            transformer_layer_spec=transformer_layer_spec,
            vocab_size=vocab_size,
            max_sequence_length=max_sequence_length,
            position_embedding_type="none",
            **kwargs,
        )
        self.sdar_rotary = PositionRotaryEmbedding(config.kv_channels, rotary_base, rotary_percent)
        self.rotary_base = rotary_base
        cores = [m for m in self.modules() if isinstance(m, self.core_attention_type)]
        for core in cores:
            core.use_rotary(self.sdar_rotary)
        self._rope_in_core = bool(cores)
        self._mask_caches = list({id(core.mask_cache): core.mask_cache for core in cores}.values())


class SDARModel(RoPEInCoreModel):
    """``GPTModel`` over ``[x_t ; x_0]`` trained with the block-diffusion objective.

    ``forward(input_ids [b, 2L], position_ids [b, 2L], attention_mask = layout [b, 2, L],
    labels = x_0 [b, L])`` returns ``[b, L, 2]``: per-token cross-entropy of the noised half against
    the clean token at the same position, and whether the prediction was right (for logging).
    Without labels it returns the noised half's logits ``[b, L, vocab / tp]``.
    """

    core_attention_type = SDARCoreAttention
    description = "the SDAR model"

    def __init__(
        self,
        config: TransformerConfig,
        transformer_layer_spec: Any,
        vocab_size: int,
        max_sequence_length: int,
        sdar_config: SDARConfig,
        rotary_base: float = 10000.0,
        rotary_percent: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            config, transformer_layer_spec, vocab_size, max_sequence_length, rotary_base, rotary_percent,
            **kwargs,
        )  # fmt: skip
        self.sdar_config = sdar_config
        self._last_layout: tuple | None = None

    def forward(
        self,
        input_ids: torch.Tensor | None,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        decoder_input: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        loss_index: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        unsupported = {k for k, v in kwargs.items() if v is not None}
        if unsupported:
            raise ValueError(f"SDARModel.forward does not take {sorted(unsupported)}")
        if loss_index is not None and labels is None:
            raise ValueError("loss_index selects where the loss is computed: pass labels with it")
        if decoder_input is None and self.pre_process:
            decoder_input = self.embedding(input_ids=input_ids, position_ids=None)
        if self._rope_in_core:
            attention_mask, rotary = self._layout_with_positions(attention_mask, position_ids), None
        else:
            rotary = self.sdar_rotary(position_ids)
        hidden = self.decoder(
            hidden_states=decoder_input, attention_mask=attention_mask, rotary_pos_emb=rotary
        )
        if not self.post_process:
            return hidden
        if loss_index is not None:
            return self.selected_output(hidden, labels, loss_index)
        return self.noised_half_output(hidden, labels)

    def _layout_with_positions(self, layout: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """``[b, 3, L]``: the layout plus the clean positions (the noised copy repeats them).

        The same layout and position tensors give the same tensor back, so repeated forwards of one
        micro-batch share the masks and RoPE tables cached per layout.
        """
        if layout is None or layout.dim() != 3 or layout.shape[1] != 2:
            shape = None if layout is None else list(layout.shape)
            raise ValueError(
                f"SDARModel needs the [batch, 2, L] layout tensor as attention_mask, got {shape}"
            )
        seq = layout.shape[-1]
        if tuple(position_ids.shape) != (layout.shape[0], 2 * seq):
            raise ValueError(
                f"position_ids cover {list(position_ids.shape)} but the layout describes "
                f"{layout.shape[0]} rows x 2 x {seq} tokens"
            )
        memo = self._last_layout
        if (
            memo is not None
            and memo[0] is layout
            and memo[1] is position_ids
            and memo[2] == (layout._version, position_ids._version)
        ):
            return memo[3]
        positions = position_ids[:, :seq].to(layout.dtype).unsqueeze(1)
        combined = torch.cat([layout, positions], dim=1)
        for cache in self._mask_caches:  # the loader's host copy of the layout serves both tensors
            host = cache.host_copy(layout)
            if host is not None:
                cache.set_host_copy(combined, host)
        self._last_layout = (layout, position_ids, (layout._version, position_ids._version), combined)
        return combined

    def noised_half_output(self, hidden: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Output layer and loss on the noised half ``hidden[:L]`` only.

        Under sequence parallelism each rank holds ``2L / tp`` consecutive positions, so the noised
        half spans only some ranks: the sequence is gathered, its first half re-split evenly, and the
        (sequence-parallel) output layer gathers that half again as usual. Gradients flow back through
        the split (the gathered copy's gradient is identical on every rank).
        """
        if self.config.sequence_parallel:
            full = self._gather_sequence(hidden)
            noised = scatter_to_sequence_parallel_region(full[: full.shape[0] // 2], group=self.tp_group)
        else:
            noised = hidden[: hidden.shape[0] // 2]
        logits, _ = self.output_layer(noised, weight=self._output_weight())  # [L, b, v/tp]
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        ce = self.compute_language_model_loss(labels, logits)  # [b, L]
        correct = vocab_parallel_correct(logits.detach(), labels, self.tp_group)
        return torch.stack([ce, correct.to(ce.dtype)], dim=-1)

    def selected_output(
        self, hidden: torch.Tensor, labels: torch.Tensor, loss_index: torch.Tensor
    ) -> torch.Tensor:
        """Output layer and loss on the selected noised positions only; ``[b, L, 2]`` like
        :meth:`noised_half_output`, zero where nothing was selected.

        ``loss_index`` ``[n]`` (int64, ascending or not) indexes the row-major ``[b, L]`` noised
        positions, typically the masked ones (about half of them): only they carry loss, and the
        output layer and cross-entropy are the largest per-token cost after the body. Every
        tensor-parallel rank must pass the same index. The values are not checked (that would need a
        host read); :func:`masked_loss_index` builds a valid one. Under sequence parallelism the
        ``n`` rows are padded to a multiple of the tensor-parallel size and split like the sequence.
        """
        if loss_index.dim() != 1 or loss_index.dtype != torch.int64:
            raise ValueError(
                f"loss_index must be a 1-D int64 tensor of positions in [batch x L], got "
                f"{loss_index.dtype} of shape {list(loss_index.shape)}"
            )
        batch, seq = labels.shape
        count = loss_index.numel()
        split = self.config.tensor_model_parallel_size if self.config.sequence_parallel else 1
        padded = max(split, -(-count // split) * split)
        index = (
            torch.cat([loss_index, loss_index.new_zeros(padded - count)]) if padded > count else loss_index
        )
        full = self._gather_sequence(hidden) if self.config.sequence_parallel else hidden
        noised = full[:seq].reshape(seq * batch, -1)  # [L x b, h]: position s of row r is s * b + r
        rows = noised.index_select(0, (index % seq) * batch + index // seq).unsqueeze(1)  # [n', 1, h]
        if self.config.sequence_parallel:
            rows = scatter_to_sequence_parallel_region(rows, group=self.tp_group)
        logits, _ = self.output_layer(rows, weight=self._output_weight())  # [n', 1, v/tp]
        targets = labels.reshape(-1).index_select(0, index).unsqueeze(0)  # [1, n']
        ce = self.compute_language_model_loss(targets, logits)[0, :count]  # padding carries no loss
        correct = vocab_parallel_correct(logits.detach(), targets, self.tp_group)[0, :count]
        values = torch.stack([ce, correct.to(ce.dtype)], dim=-1)
        out = values.new_zeros(batch * seq, 2).index_copy(0, loss_index, values)
        return out.view(batch, seq, 2)

    def _output_weight(self) -> torch.Tensor | None:
        return self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None

    def _gather_sequence(self, hidden: torch.Tensor) -> torch.Tensor:
        """The whole ``[2L, b, h]`` sequence from the sequence-parallel shards; in backward each rank
        keeps its own shard of the gradient (the gathered copy's gradient is the same everywhere)."""
        return gather_from_sequence_parallel_region(
            hidden, tensor_parallel_output_grad=False, group=self.tp_group
        )


def masked_loss_index(masked: torch.Tensor) -> torch.Tensor:
    """``loss_index`` for :meth:`SDARModel.selected_output`: the masked positions of ``masked``
    ``[b, L]`` in row-major order. On the host (the data loader's CPU tensors) this costs no device
    synchronisation; on a GPU tensor it reads the count back."""
    return masked.reshape(-1).nonzero().squeeze(1)


def vocab_parallel_correct(logits: torch.Tensor, labels: torch.Tensor, tp_group: Any) -> torch.Tensor:
    """Whether the label is the argmax of vocab-parallel ``logits`` ``[s, b, v/tp]``; ``[b, s]``."""
    tp_size = torch.distributed.get_world_size(tp_group) if tp_group is not None else 1
    part = logits.shape[-1]
    rank = torch.distributed.get_rank(tp_group) if tp_size > 1 else 0
    labels_sb = labels.transpose(0, 1)
    local = labels_sb - rank * part
    in_range = (local >= 0) & (local < part)
    target = torch.gather(logits, -1, local.clamp(0, part - 1).unsqueeze(-1)).squeeze(-1)
    target = torch.where(in_range, target, torch.zeros_like(target)).float()
    best = logits.max(dim=-1).values.float()
    if tp_size > 1:
        torch.distributed.all_reduce(target, group=tp_group)
        torch.distributed.all_reduce(best, op=torch.distributed.ReduceOp.MAX, group=tp_group)
    return (target >= best).transpose(0, 1)


def qwen3_transformer_config(**overrides: Any) -> TransformerConfig:
    """A ``TransformerConfig`` with Qwen3's architecture choices (GQA sizes come from overrides)."""
    base: dict[str, Any] = dict(
        normalization="RMSNorm",
        layernorm_epsilon=1e-6,
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
    )
    base.update(overrides)
    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    unknown = set(base) - fields
    if unknown:
        raise ValueError(f"not TransformerConfig fields: {sorted(unknown)}")
    return TransformerConfig(**base)


class ARModel(RoPEInCoreModel):
    """The causal-LM baseline (``--sdar-objective ar``) with RoPE applied in its core attention.

    Same parameters, state-dict keys and loss as ``GPTModel``: the only change is where RoPE runs.
    Its :class:`~megatron_sdar.attention.CausalCoreAttention` layers receive the position ids
    ``[b, 1, s]`` as ``attention_mask`` and rotate query and key with one compiled kernel, as the SDAR
    model does, so the two objectives are compared with the same kernels. For the local layer spec
    (:func:`ar_layer_spec` without Transformer Engine; with TE, use ``GPTModel``, TE fuses RoPE).
    """

    core_attention_type = CausalCoreAttention
    description = "the AR baseline"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self._rope_in_core and len(self.decoder.layers) > 0:  # a stage may hold no layers
            raise ValueError(
                "ARModel applies RoPE in CausalCoreAttention (the local spec from ar_layer_spec); "
                "with Transformer Engine build a GPTModel"
            )

    def forward(
        self,
        input_ids: torch.Tensor | None,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError("the AR baseline is causal over the window: pass attention_mask=None")
        positions = position_ids.to(torch.int32).unsqueeze(1)  # [b, 1, s]: read by the core attention
        return super().forward(input_ids, position_ids, positions, **kwargs)


def build_sdar_model(
    config: TransformerConfig,
    sdar_config: SDARConfig,
    vocab_size: int,
    max_sequence_length: int,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    share_embeddings_and_output_weights: bool = False,
    rotary_base: float = 10000.0,
    use_transformer_engine: bool = False,
    vp_stage: int | None = None,
) -> SDARModel:
    """Build the SDAR model for this pipeline stage (stage flags default to the current rank's)."""
    if parallel_state.model_parallel_is_initialized():
        for field, actual in (
            ("tensor_model_parallel_size", parallel_state.get_tensor_model_parallel_world_size()),
            ("pipeline_model_parallel_size", parallel_state.get_pipeline_model_parallel_world_size()),
        ):
            if getattr(config, field) != actual:
                raise ValueError(
                    f"TransformerConfig.{field}={getattr(config, field)} but Megatron was initialised "
                    f"with {actual}; build the config with the parallel sizes in use"
                )
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    return SDARModel(
        config=config,
        transformer_layer_spec=sdar_layer_spec(config, sdar_config, use_transformer_engine, vp_stage),
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        sdar_config=sdar_config,
        rotary_base=rotary_base,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=share_embeddings_and_output_weights,
        vp_stage=vp_stage,
    )
