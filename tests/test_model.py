"""The SDAR model on CPU (dense-mask SDPA path): what each output may and may not depend on."""

from __future__ import annotations

import pytest
import torch

from megatron_sdar.config import SDARConfig
from megatron_sdar.masks import document_ids_from_lengths, make_layout
from megatron_sdar.positions import sdar_position_ids
from tests.helpers import tiny_model

VOCAB = 64
B = 4
L = 32
DOCS = [13, 19]  # two documents; the first is not block aligned


@pytest.fixture(scope="module")
def model(megatron_world):
    m = tiny_model(SDARConfig(block_size=B, mask_token_id=VOCAB - 1), vocab_size=VOCAB, seq_length=L)
    return m.eval()


def hidden_states(model, input_ids, doc_ids, restart_positions=False, position_ids=None):
    """Final hidden states ``[2L, b, h]`` of the whole ``[x_t ; x_0]`` sequence."""
    layout = make_layout(doc_ids, B, "document")
    if position_ids is None:
        position_ids = sdar_position_ids(doc_ids, restart_positions)
    with torch.no_grad():
        return model.decode(input_ids, position_ids, layout)


def setup():
    gen = torch.Generator().manual_seed(7)
    clean = torch.randint(0, VOCAB - 1, (1, L), generator=gen)
    noised = clean.clone()
    noised[torch.rand((1, L), generator=gen) < 0.5] = VOCAB - 1
    doc_ids = document_ids_from_lengths(DOCS).unsqueeze(0)
    return clean, noised, doc_ids, gen


def blocks_of(pos: int) -> tuple[int, int]:
    """(document, block-in-document) of window position ``pos`` under per-document counting."""
    start = 0
    for d, n in enumerate(DOCS):
        if pos < start + n:
            return d, (pos - start) // B
        start += n
    raise IndexError(pos)


def positions_where(pred) -> list[int]:
    return [i for i in range(L) if pred(*blocks_of(i))]


def changed_rows(a: torch.Tensor, b: torch.Tensor) -> set[int]:
    diff = (a - b).abs().amax(dim=(1, 2))
    return {i for i in range(a.shape[0]) if diff[i] > 1e-5}


def perturb(tokens: torch.Tensor, positions: list[int], gen: torch.Generator) -> torch.Tensor:
    out = tokens.clone()
    for i in positions:
        out[0, i] = (out[0, i] + 1 + int(torch.randint(0, VOCAB - 3, (1,), generator=gen))) % (VOCAB - 1)
    return out


def test_clean_half_ignores_noised_tokens(model):
    clean, noised, doc_ids, gen = setup()
    base = hidden_states(model, torch.cat([noised, clean], -1), doc_ids)
    other = perturb(noised, list(range(L)), gen)
    changed = hidden_states(model, torch.cat([other, clean], -1), doc_ids)
    assert changed_rows(base[L:], changed[L:]) == set()
    assert changed_rows(base[:L], changed[:L])  # the noised half itself does change


@pytest.mark.parametrize("target", [(0, 1), (0, 3), (1, 0), (1, 4)])
def test_noised_block_dependencies(model, target):
    doc, blk = target
    clean, noised, doc_ids, gen = setup()
    rows = positions_where(lambda d, b: (d, b) == target)
    base = hidden_states(model, torch.cat([noised, clean], -1), doc_ids)

    def rows_changed(new_noised, new_clean):
        out = hidden_states(model, torch.cat([new_noised, new_clean], -1), doc_ids)
        return changed_rows(base[rows], out[rows])

    # Other noised blocks (same document or not): no effect.
    others = positions_where(lambda d, b: (d, b) != target)
    assert rows_changed(perturb(noised, others, gen), clean) == set()
    # Clean blocks at or after the target block, and clean tokens of other documents: no effect.
    later_clean = positions_where(lambda d, b: (d == doc and b >= blk) or d != doc)
    assert rows_changed(noised, perturb(clean, later_clean, gen)) == set()
    # Earlier clean blocks of the same document: every row of the block changes.
    earlier_clean = positions_where(lambda d, b: d == doc and b < blk)
    if blk > 0:
        assert len(rows_changed(noised, perturb(clean, earlier_clean, gen))) == len(rows)
    # The block's own noised tokens: changes (bidirectional inside the block).
    assert rows_changed(perturb(noised, rows[:1], gen), clean)


def test_clean_half_is_block_causal(model):
    clean, noised, doc_ids, gen = setup()
    base = hidden_states(model, torch.cat([noised, clean], -1), doc_ids)
    # Changing the last token of document 0's block 1 changes every clean row of that block
    # (earlier rows included: block-causal, not token-causal), nothing in earlier blocks or doc 1.
    block1 = positions_where(lambda d, b: (d, b) == (0, 1))
    out = hidden_states(model, torch.cat([noised, perturb(clean, block1[-1:], gen)], -1), doc_ids)
    changed = changed_rows(base[L:], out[L:])
    later_doc0 = set(positions_where(lambda d, b: d == 0 and b >= 1))
    assert changed == later_doc0


def test_positions_are_relative_within_documents(model):
    """Attention never crosses documents and RoPE is relative, so restarting positions per document,
    or shifting them all, gives the same outputs; positions at other distances change both halves
    (the core attention rotates both halves by the clean positions the layout carries)."""
    clean, noised, doc_ids, _ = setup()
    tokens = torch.cat([noised, clean], -1)
    continuous = hidden_states(model, tokens, doc_ids, restart_positions=False)
    restarted = hidden_states(model, tokens, doc_ids, restart_positions=True)
    torch.testing.assert_close(continuous, restarted, atol=2e-5, rtol=1e-5)
    shifted = (torch.arange(L) + 7).repeat(1, 2)
    torch.testing.assert_close(continuous, hidden_states(model, tokens, doc_ids, position_ids=shifted))
    stretched = (torch.arange(L) * 2).repeat(1, 2)
    other = hidden_states(model, tokens, doc_ids, position_ids=stretched)
    assert (continuous[:L] - other[:L]).abs().max() > 1e-3
    assert (continuous[L:] - other[L:]).abs().max() > 1e-3


def test_mask_built_once_per_layout_and_shared_by_layers(model):
    clean, noised, doc_ids, _ = setup()
    layout = make_layout(doc_ids, B, "document")
    pos = sdar_position_ids(doc_ids, False)
    model.mask_cache.clear()
    before = model.mask_cache.builds
    with torch.no_grad():
        model(torch.cat([noised, clean], -1), pos, layout)
        model(torch.cat([noised, clean], -1), pos, layout)
    assert model.config.num_layers > 1
    assert model.mask_cache.builds - before == 1
    cores = [layer.self_attention.core_attention for layer in model.decoder.layers]
    assert all(core.mask_cache is model.mask_cache and core.rotary is model.sdar_rotary for core in cores)
    with torch.no_grad():
        model(torch.cat([noised, clean], -1), pos, make_layout(doc_ids, B, "document"))
    assert model.mask_cache.builds - before == 2


def test_forward_backward_and_output_shapes(megatron_world):
    sdar = SDARConfig(block_size=B, mask_token_id=VOCAB - 1)
    model = tiny_model(sdar, vocab_size=VOCAB, seq_length=L, tied=True)
    clean, noised, doc_ids, _ = setup()
    layout = make_layout(doc_ids, B, "document")
    pos = sdar_position_ids(doc_ids, False)
    logits = model(torch.cat([noised, clean], -1), pos, layout)
    assert logits.shape == (1, L, VOCAB)  # the noised half only
    out = model(torch.cat([noised, clean], -1), pos, layout, labels=clean)
    assert out.shape == (1, L, 2)
    expected_ce = torch.nn.functional.cross_entropy(logits[0].detach(), clean[0], reduction="none")
    torch.testing.assert_close(out[0, :, 0].detach(), expected_ce, atol=1e-5, rtol=1e-5)
    expected_correct = (logits[0].argmax(-1) == clean[0]).float()
    assert torch.equal(out[0, :, 1].detach(), expected_correct)
    out[..., 0].sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.embedding.word_embeddings.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("tied", [False, True])
def test_loss_on_masked_positions_only_equals_the_noised_half(megatron_world, tied):
    """``loss_index``: the output layer runs on the masked positions only; their CE, correctness and
    every gradient of the SDAR loss equal the noised-half path's; unselected positions are zero."""
    from megatron_sdar.batch import build_sdar_batch
    from megatron_sdar.loss import sdar_loss
    from megatron_sdar.model.sdar import masked_loss_index

    sdar = SDARConfig(block_size=B, mask_token_id=VOCAB - 1)
    torch.manual_seed(0)
    model = tiny_model(sdar, vocab_size=VOCAB, seq_length=L, tied=tied)
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB - 1, (3, L), generator=gen)
    doc_ids = document_ids_from_lengths(DOCS).unsqueeze(0).expand(3, L)
    batch = build_sdar_batch(tokens, doc_ids, torch.ones_like(tokens, dtype=torch.bool), sdar, gen)
    index = masked_loss_index(batch.masked)
    assert 0 < index.numel() < batch.masked.numel()

    def run(**kwargs):
        model.zero_grad(set_to_none=True)
        out = model(batch.input_ids, batch.position_ids, batch.layout, labels=batch.labels, **kwargs)
        loss_sum, count, _ = sdar_loss(out, batch)
        (loss_sum / count).backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    full, full_grads = run()
    selected, selected_grads = run(loss_index=index)
    masked = batch.masked.unsqueeze(-1).expand_as(full)
    torch.testing.assert_close(selected[masked], full[masked], atol=1e-5, rtol=1e-5)
    assert not selected[~masked].any()
    for name, grad in full_grads.items():
        torch.testing.assert_close(selected_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)

    # a micro-batch with nothing masked: zero output, still a graph to differentiate
    empty = model(
        batch.input_ids, batch.position_ids, batch.layout, labels=batch.labels,
        loss_index=index[:0],
    )  # fmt: skip
    assert empty.shape == (3, L, 2) and not empty.any()
    with pytest.raises(ValueError, match="int64"):
        model(batch.input_ids, batch.position_ids, batch.layout, labels=batch.labels, loss_index=index.int())
    with pytest.raises(ValueError, match="pass labels"):
        model(batch.input_ids, batch.position_ids, batch.layout, loss_index=index)


def test_wrong_inputs_fail_clearly(model):
    clean, noised, doc_ids, _ = setup()
    pos = sdar_position_ids(doc_ids, False)
    with pytest.raises(ValueError, match="layout"):
        model(torch.cat([noised, clean], -1), pos, None)
    short_layout = make_layout(doc_ids[:, : L // 2], B, "document")
    with pytest.raises(ValueError, match="layout describes"):
        model(torch.cat([noised, clean], -1), pos, short_layout)


def test_mask_cache_hits_detached_aliases_and_rebuilds_after_changes():
    """Activation recompute replays a layer with a detached alias of the layout: it must reuse the
    mask; a copy with equal values is another micro-batch's layout and an in-place edit changes it."""
    from megatron_sdar.attention.cache import SDARMaskCache
    from megatron_sdar.masks import CleanAttention

    _, _, doc_ids, _ = setup()
    layout = make_layout(doc_ids, B, "document")
    cache = SDARMaskCache()
    first = cache.get(layout, CleanAttention.BLOCK_CAUSAL, "sdpa")
    assert cache.get(layout.detach(), CleanAttention.BLOCK_CAUSAL, "sdpa") is first
    assert cache.builds == 1
    cache.get(layout.clone(), CleanAttention.BLOCK_CAUSAL, "sdpa")
    assert cache.builds == 2
    cache.get(layout, CleanAttention.CAUSAL, "sdpa")
    assert cache.builds == 3
    layout[0, 0, :] = 0  # one document now: the mask must change
    changed = cache.get(layout, CleanAttention.BLOCK_CAUSAL, "sdpa")
    assert cache.builds == 4
    assert not torch.equal(changed, first)
