"""The SDAR model: Megatron-Core's ``GPTModel`` with SDAR attention, positions and output.

Composition, not patching:

* the layer spec is Megatron's own (local or Transformer Engine) with its ``core_attention``
  replaced by :class:`~megatron_sdar.attention.SDARCoreAttention` (:func:`sdar_layer_spec`);
* :class:`SDARModel` subclasses ``GPTModel`` to compute RoPE from explicit position ids (the noised
  copy gets the clean copy's positions) and to run the output layer and the vocab-parallel
  cross-entropy on the noised half only, or only on its masked positions (``loss_index``), which is
  all the diffusion loss needs. With the joint AR loss (``ar_labels``) the output layer also runs on
  the clean half, or on its positions with a next-token target (``ar_index``)."""

from __future__ import annotations

from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_sdar.attention.cache import TensorKeyedCache
from megatron_sdar.attention.core import SDARCoreAttention
from megatron_sdar.config import SDARConfig
from megatron_sdar.context_parallel import sequence_index
from megatron_sdar.embedding_noise import add_mask_embedding_noise
from megatron_sdar.masks import LAYOUT_ROWS, CleanAttention, layout_with_positions
from megatron_sdar.model.base import RoPEInCoreModel
from megatron_sdar.model.specs import sdar_layer_spec

NOISED, CLEAN = 0, 1  # the halves of [x_t ; x_0]


class SDARModel(RoPEInCoreModel):
    """``GPTModel`` over ``[x_t ; x_0]`` trained with the block-diffusion objective.

    ``forward(input_ids [b, 2L], position_ids [b, 2L], attention_mask = layout [b, 2, L],
    labels = x_0 [b, L])`` returns ``[b, L, 2]``: per-token cross-entropy of the noised half against
    the clean token at the same position, and whether the prediction was right (for logging).
    Without labels it returns the noised half's logits ``[b, L, vocab / tp]``. ``loss_index`` runs
    the output layer on the selected positions only (:meth:`selected_output`); ``layout_host``, a CPU
    copy of the layout (the data loader's), spares what is planned on the host a device read.

    ``ar_labels`` ``[b, L]`` (the joint AR + diffusion loss) are next-token targets for the clean
    half: clean position ``i`` predicts ``ar_labels[:, i]`` (``x_0[i + 1]`` where that is a target,
    :func:`~megatron_sdar.loss.next_token_targets`), and two columns, its cross-entropy and whether it
    was right, follow the noised half's: ``[b, L, 4]``. ``ar_index`` (built like ``loss_index``, over
    the clean positions) runs that output layer on the positions with a target only. This needs the
    token-causal clean half (``clean_attention="causal"``): under the block-causal rule a clean token
    sees the rest of its block, its own next token included, so the prediction would read its target.

    Under context parallelism (:mod:`megatron_sdar.context_parallel`) ``input_ids`` holds this rank's
    ``2L / cp`` tokens (its chunks of the noised half, then of the clean half), ``labels`` and the
    indices its ``L / cp`` positions, while ``position_ids`` and the layout describe the whole window;
    the outputs cover the rank's positions.
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
        self._layouts = TensorKeyedCache(max_entries=4)  # [b, 3, L] layouts by (layout, position ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        decoder_input: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        loss_index: torch.Tensor | None = None,
        layout_host: torch.Tensor | None = None,
        ar_labels: torch.Tensor | None = None,
        ar_index: torch.Tensor | None = None,
        mask_embedding_noise: tuple[float, int] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        unsupported = {k for k, v in kwargs.items() if v is not None}
        if unsupported:
            raise ValueError(f"SDARModel.forward does not take {sorted(unsupported)}")
        if loss_index is not None and labels is None:
            raise ValueError("loss_index selects where the loss is computed: pass labels with it")
        if ar_labels is not None and labels is None:
            raise ValueError("ar_labels add the next-token loss to the diffusion loss: pass labels too")
        if ar_index is not None and ar_labels is None:
            raise ValueError("ar_index selects where the next-token loss is computed: pass ar_labels with it")
        if ar_labels is not None and self.sdar_config.clean_attention is not CleanAttention.CAUSAL:
            raise ValueError(
                "a next-token loss on the clean half needs token-causal clean attention "
                f"(clean_attention='causal', --sdar-clean-attention causal), got "
                f"{self.sdar_config.clean_attention.value!r}: block-causal attention lets a clean "
                "token see the next token of its block, which is its target"
            )
        hidden = self.decode(
            input_ids, position_ids, attention_mask, decoder_input, layout_host, mask_embedding_noise
        )
        if not self.post_process:
            return hidden
        full = self._whole_sequence(hidden)
        if loss_index is not None:
            diffusion = self._selected_output(full, labels, loss_index, NOISED)
        else:
            diffusion = self._half_output(full, labels, NOISED)
        if ar_labels is None:
            return diffusion
        if ar_index is not None:
            ar = self._selected_output(full, ar_labels, ar_index, CLEAN)
        else:
            ar = self._half_output(full, ar_labels, CLEAN)
        return torch.cat([diffusion, ar], dim=-1)

    def decode(
        self,
        input_ids: torch.Tensor | None,
        position_ids: torch.Tensor,
        layout: torch.Tensor,
        decoder_input: torch.Tensor | None = None,
        layout_host: torch.Tensor | None = None,
        mask_embedding_noise: tuple[float, int] | None = None,
    ) -> torch.Tensor:
        """This stage's decoder output ``[2L, b, h]`` over the whole ``[x_t ; x_0]`` sequence (the
        last stage's includes the final norm); checks read the clean half ``[L:]`` from it.

        ``mask_embedding_noise`` ``(std, seed)``: in training, Gaussian noise on the embedding output
        at the mask token's positions (:mod:`megatron_sdar.embedding_noise`); the first stage only."""
        if decoder_input is None and self.pre_process:
            decoder_input = self.embedding(input_ids=input_ids, position_ids=None)
            if mask_embedding_noise is not None and self.training:
                std, seed = mask_embedding_noise
                shard = (
                    (parallel_state.get_tensor_model_parallel_rank(), self.config.tensor_model_parallel_size)
                    if self.config.sequence_parallel
                    else (0, 1)
                )
                rows = {}
                if self.config.context_parallel_size > 1:  # this rank's tokens of the 2L sequence
                    window = layout.shape[-1]
                    cp_rank = parallel_state.get_context_parallel_rank()
                    rows = dict(
                        sequence_index=sequence_index(window, self.config.context_parallel_size, cp_rank),
                        sequence_length=2 * window,
                    )
                decoder_input = add_mask_embedding_noise(
                    decoder_input, input_ids, self.sdar_config.mask_token_id, std, seed, shard, **rows
                )
        if self._rope_in_core:
            attention_mask, rotary = self._layout_with_positions(layout, position_ids), None
        else:
            attention_mask, rotary = layout, self.sdar_rotary(position_ids)
        if layout_host is not None:  # what is planned on the host (the split plan) reads this copy
            self.mask_cache.set_host_copy(attention_mask, layout_host)
        return self.decoder(hidden_states=decoder_input, attention_mask=attention_mask, rotary_pos_emb=rotary)

    def _layout_with_positions(self, layout: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """``[b, 3, L]``: the layout plus the clean positions (the noised copy repeats them).

        The same layout and position tensors (:func:`~megatron_sdar.attention.cache.tensor_key`) give
        the same tensor back, so repeated forwards of one micro-batch share the masks and RoPE tables
        cached per layout.
        """
        if layout is None or layout.dim() != 3 or layout.shape[1] != LAYOUT_ROWS:
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
        return self._layouts.get(
            (layout, position_ids), (), lambda: layout_with_positions(layout, position_ids[:, :seq])
        )[0]

    def noised_half_output(self, hidden: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Output layer and loss on the noised half ``hidden[:L]`` only.

        Under sequence parallelism each rank holds ``2L / tp`` consecutive positions, so the noised
        half spans only some ranks: the sequence is gathered, its first half re-split evenly, and the
        (sequence-parallel) output layer gathers that half again as usual. Gradients flow back through
        the split (the gathered copy's gradient is identical on every rank).
        """
        return self._half_output(self._whole_sequence(hidden), labels, NOISED)

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
        return self._selected_output(self._whole_sequence(hidden), labels, loss_index, NOISED)

    def _whole_sequence(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[2L, b, h]`` on every rank: gathered once under sequence parallelism, so the noised and
        the clean half's outputs share one gather."""
        return self._gather_sequence(hidden) if self.config.sequence_parallel else hidden

    def _half_output(self, full: torch.Tensor, labels: torch.Tensor | None, half: int) -> torch.Tensor:
        """Output layer (and, with ``labels``, the loss) on one half of the whole sequence ``full``:
        ``[b, L, 2]`` (CE, correct), or the logits ``[b, L, v/tp]`` without labels."""
        seq = full.shape[0] // 2
        part = full[half * seq : (half + 1) * seq]
        if self.config.sequence_parallel:
            part = scatter_to_sequence_parallel_region(part, group=self.tp_group)
        logits, _ = self.output_layer(part, weight=self._output_weight())  # [L, b, v/tp]
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        ce = self.compute_language_model_loss(labels, logits)  # [b, L]
        correct = vocab_parallel_correct(logits.detach(), labels, self.tp_group)
        return torch.stack([ce, correct.to(ce.dtype)], dim=-1)

    def _selected_output(
        self, full: torch.Tensor, labels: torch.Tensor, loss_index: torch.Tensor, half: int
    ) -> torch.Tensor:
        """:meth:`selected_output` on one half of the whole sequence ``full``."""
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
        # [L x b, h]: position s of row r is s * b + r
        part = full[half * seq : (half + 1) * seq].reshape(seq * batch, -1)
        rows = part.index_select(0, (index % seq) * batch + index // seq).unsqueeze(1)  # [n', 1, h]
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
    ``[b, L]`` in row-major order (``ar_index`` likewise, from the positions with a next-token
    target). On the host (the data loader's CPU tensors) this costs no device synchronisation; on a
    GPU tensor it reads the count back."""
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
