"""The joint AR + diffusion loss (``--sdar-ar-loss-weight``): next-token targets that stay inside
documents, a clean half that never sees its own target, the loss by hand, weight 0 as before, the
flag's checks, the FLOP count, and an SDAR checkpoint scored and decoded both ways."""

from __future__ import annotations

import types
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from megatron_sdar.batch import BATCH_FIELDS, SDARBatch, build_sdar_batch
from megatron_sdar.config import SDARConfig
from megatron_sdar.loss import next_token_targets, sdar_loss
from megatron_sdar.masks import document_ids_from_eod, make_layout
from megatron_sdar.model.sdar import masked_loss_index, vocab_parallel_correct
from tests.helpers import tiny_model

VOCAB, EOD, MASK = 128, 1, 127
B, L = 4, 16
CAUSAL = SDARConfig(block_size=B, mask_token_id=MASK, clean_attention="causal")


def sample_batch(seed: int = 0, rows: int = 2, seq: int = L, sdar: SDARConfig = CAUSAL) -> SDARBatch:
    """``rows`` windows of random tokens, several documents each (EOD-closed), the last row ending in
    a padding document (not eligible)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, VOCAB - 1, (rows, seq), generator=gen)
    tokens[0, 5] = tokens[-1, 9] = EOD
    doc_ids = document_ids_from_eod(tokens, EOD)
    eligible = torch.ones_like(tokens, dtype=torch.bool)
    doc_ids[-1, -3:] = int(doc_ids[-1].max()) + 1  # padding: a pseudo-document of its own
    eligible[-1, -3:] = False
    tokens[-1, -3:] = EOD
    return build_sdar_batch(tokens, doc_ids, eligible, sdar, gen)


def model_call(model, batch: SDARBatch, ar: bool = True, selected: bool = False, **kwargs):
    """The model's training forward, with the AR targets (and, ``selected``, both indices)."""
    targets, valid = next_token_targets(batch.labels, batch.layout, batch.eligible)
    extra = {"ar_labels": targets} if ar else {}
    if selected:
        extra["loss_index"] = masked_loss_index(batch.masked)
        if ar:
            extra["ar_index"] = masked_loss_index(valid)
    return model(batch.input_ids, batch.position_ids, batch.layout, labels=batch.labels, **extra, **kwargs)


def test_next_token_targets_stay_inside_documents():
    # row 0: two documents closed by EOD (1), then padding (its own document, not eligible);
    # row 1 (SFT): prompt tokens 3, 4 are not eligible, the response 5, 6, EOD is
    tokens = torch.tensor([[5, 6, 1, 7, 8, 1, 0, 0], [3, 4, 5, 6, 1, 9, 9, 9]])
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2], [0, 0, 0, 0, 0, 1, 1, 1]])
    eligible = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    layout = make_layout(doc_ids, 4, "document")
    targets, valid = next_token_targets(tokens, layout, eligible)
    assert targets[:, :-1].tolist() == tokens[:, 1:].tolist()
    # 5->6, 6->EOD, 7->8, 8->EOD; not EOD->7 (next document), EOD->pad, pad->pad, nor the last
    assert valid[0].tolist() == [True, True, False, True, True, False, False, False]
    # the last prompt token predicts the first response token; no prompt token is a target; a
    # document's own padding (9 after the EOD of document 1) is, where it is eligible
    assert valid[1].tolist() == [False, True, True, True, False, True, True, False]
    assert next_token_targets(tokens, layout_with_rows(layout), eligible)[1].equal(valid)  # [b, 3, L]


def layout_with_rows(layout: torch.Tensor) -> torch.Tensor:
    from megatron_sdar.masks import layout_with_positions

    return layout_with_positions(layout, torch.arange(layout.shape[-1]).expand(layout.shape[0], -1))


def clean_logits(model, input_ids, batch: SDARBatch) -> torch.Tensor:
    """The clean half's logits ``[L, b, V]`` (TP=1) for ``input_ids`` ``[b, 2L]``."""
    hidden = model.decode(input_ids, batch.position_ids, batch.layout)
    seq = batch.labels.shape[-1]
    return model.output_layer(hidden[seq:], weight=None)[0]


def test_no_clean_position_sees_its_target(megatron_world):
    """Changing token ``i + 1`` and everything after it (both copies) leaves clean position ``i``'s
    logits as they were, and its next-token loss has no gradient there; block-causal attention would
    leak (the model refuses the AR loss with it) except at block-final positions."""
    model = tiny_model(CAUSAL, vocab_size=VOCAB, seq_length=L, seed=3)
    batch = sample_batch(seed=1, rows=1)
    targets, valid = next_token_targets(batch.labels, batch.layout, batch.eligible)
    base = clean_logits(model, batch.input_ids, batch)
    gen = torch.Generator().manual_seed(7)
    positions = valid[0].nonzero().flatten().tolist()
    assert len(positions) == L - 6  # not the two EOD positions, the padding, its last token or the last
    for i in positions:
        changed = batch.input_ids.clone()
        tail = torch.randint(2, VOCAB - 1, (1, L - i - 1), generator=gen)
        changed[:, i + 1 : L] = tail  # the noised copy
        changed[:, L + i + 1 :] = (tail + 1) % (VOCAB - 2) + 2  # the clean copy, the target included
        assert not torch.equal(changed[:, L + i + 1], batch.input_ids[:, L + i + 1])
        after = clean_logits(model, changed, batch)
        torch.testing.assert_close(after[i], base[i], rtol=0, atol=1e-6)

    embedded = model.embedding(input_ids=batch.input_ids, position_ids=None).detach()
    for i in positions:
        x = embedded.clone().requires_grad_(True)
        out = model(
            None, batch.position_ids, batch.layout, decoder_input=x, labels=batch.labels, ar_labels=targets
        )
        out[0, i, 2].backward()  # the next-token cross-entropy of clean position i
        grad = x.grad[:, 0].abs().sum(-1)  # [2L]
        assert grad[:L].max() == 0  # the clean half never reads the noised one
        assert grad[L + i + 1 :].max() == 0, i  # nor its target or anything after it
        assert grad[L + i] > 0  # it reads its own token

    block_causal = SDARConfig(block_size=B, mask_token_id=MASK)
    leaky = tiny_model(block_causal, vocab_size=VOCAB, seq_length=L, seed=3)
    with pytest.raises(ValueError, match="token-causal clean attention"):
        model_call(leaky, batch)
    base = clean_logits(leaky, batch.input_ids, batch)
    changed = batch.input_ids.clone()
    changed[:, L + 1] = (changed[:, L + 1] + 1) % (VOCAB - 2) + 2  # the target of position 0
    after = clean_logits(leaky, changed, batch)
    assert (after[0] - base[0]).abs().max() > 1e-3  # block-causal: position 0 sees token 1
    changed = batch.input_ids.clone()
    changed[:, L + B :] = (changed[:, L + B :] + 1) % (VOCAB - 2) + 2  # from the next block on
    after = clean_logits(leaky, changed, batch)
    torch.testing.assert_close(after[B - 1], base[B - 1], rtol=0, atol=1e-6)  # block-final: no leak


def test_loss_by_hand_at_weight_half(megatron_world):
    """``lm loss`` = diffusion (Eq. 7 over eligible tokens) + 0.5 x mean next-token CE, each part by
    hand from the model's logits over the whole 2L sequence (dense attention)."""
    model = tiny_model(CAUSAL, vocab_size=VOCAB, seq_length=L, seed=4)
    batch = sample_batch(seed=2)
    with torch.no_grad():
        out = model_call(model, batch)
        loss_sum, num_tokens, report = sdar_loss(out, batch, ar_weight=0.5)
        hidden = model.decode(batch.input_ids, batch.position_ids, batch.layout)
        logits = model.output_layer(hidden, weight=None)[0]  # [2L, b, V]
    labels, docs = batch.labels, batch.layout[:, 0]
    diffusion = ar = 0.0
    n_ar = 0
    for r in range(labels.shape[0]):
        for i in range(L):
            if batch.masked[r, i]:
                ce = F.cross_entropy(logits[i, r], labels[r, i])
                diffusion += float(ce) / float(batch.mask_prob[r, i])
            if i + 1 < L and docs[r, i] == docs[r, i + 1] and batch.eligible[r, i + 1]:
                ar += float(F.cross_entropy(logits[L + i, r], labels[r, i + 1]))
                n_ar += 1
    n_eligible = int(batch.eligible.sum())
    assert n_ar == 2 * (L - 1) - 2 - 3  # two EOD positions, three padding targets
    expected = diffusion / n_eligible + 0.5 * ar / n_ar
    assert int(num_tokens) == n_eligible
    assert float(loss_sum) / int(num_tokens) == pytest.approx(expected, rel=1e-5)
    assert float(report["lm loss"][0] / report["lm loss"][1]) == pytest.approx(expected, rel=1e-5)
    assert report["diffusion loss"].tolist() == pytest.approx([diffusion, n_eligible], rel=1e-5)
    assert report["ar loss"].tolist() == pytest.approx([ar, n_ar], rel=1e-5)
    assert float(report["ar acc"][1]) == n_ar and 0 <= float(report["ar acc"][0]) <= n_ar


def test_micro_batches_combine_each_part_by_its_own_count():
    """Megatron sums ``loss_sum`` and ``num_tokens`` over micro-batches: with the same ratio of AR to
    diffusion counts in each, the total is exactly diffusion mean + W x AR mean over all of them."""
    gen = torch.Generator().manual_seed(0)
    batches = [sample_batch(seed=5, rows=1), sample_batch(seed=6, rows=2)]
    outputs = [torch.rand(b.labels.shape[0], L, 4, generator=gen) for b in batches]
    weight = 0.3
    parts = [sdar_loss(o, b, ar_weight=weight) for o, b in zip(outputs, batches)]
    sums = [sdar_loss(o[..., :2], b) for o, b in zip(outputs, batches)]
    valid = [next_token_targets(b.labels, b.layout, b.eligible)[1] for b in batches]
    ratios = [float(n) / float(v.sum()) for (_, n, _), v in zip(sums, valid)]
    assert ratios[0] != ratios[1]  # what the one normaliser cannot express exactly ...
    ar_sum = sum(float((o[..., 2] * v).sum()) for o, v in zip(outputs, valid))
    n_ar = sum(float(v.sum()) for v in valid)
    diff_sum = sum(float(s) for s, _, _ in sums)
    n_diff = sum(int(n) for _, n, _ in sums)
    total = sum(float(s) for s, _, _ in parts) / sum(int(n) for _, n, _ in parts)
    # ... each micro-batch's AR mean weighted by its share of the diffusion count
    shares = [int(n) / n_diff for _, n, _ in sums]
    per_batch = [float((o[..., 2] * v).sum() / v.sum()) for o, v in zip(outputs, valid)]
    weighted = diff_sum / n_diff + weight * sum(s * m for s, m in zip(shares, per_batch))
    assert total == pytest.approx(weighted, rel=1e-6)
    # the logged parts are exact global means
    logged_ar = sum(p[2]["ar loss"] for p in parts)
    logged_diffusion = sum(p[2]["diffusion loss"] for p in parts)
    assert float(logged_ar[0] / logged_ar[1]) == pytest.approx(ar_sum / n_ar, rel=1e-6)
    assert float(logged_diffusion[0] / logged_diffusion[1]) == pytest.approx(diff_sum / n_diff, rel=1e-6)
    # equal ratios (the same layout twice): exact
    twice = [torch.rand(1, L, 4, generator=gen) for _ in range(2)]
    same = [sdar_loss(o, batches[0], ar_weight=weight) for o in twice]
    total = sum(float(s) for s, _, _ in same) / sum(int(n) for _, n, _ in same)
    diffusion_mean = sum(float(sdar_loss(o[..., :2], batches[0])[0]) for o in twice) / (2 * int(sums[0][1]))
    ar_mean = sum(float((o[..., 2] * valid[0]).sum()) for o in twice) / (2 * float(valid[0].sum()))
    assert total == pytest.approx(diffusion_mean + weight * ar_mean, rel=1e-6)


def test_zero_weight_is_the_diffusion_loss_as_before(megatron_world):
    """Without AR targets the output, loss and gradients are bit for bit the noised half's output
    layer and cross-entropy alone; with them the diffusion columns do not change."""
    for selected in (False, True):
        model = tiny_model(CAUSAL, vocab_size=VOCAB, seq_length=L, seed=5)
        batch = sample_batch(seed=3)
        out = model_call(model, batch, ar=False, selected=selected)
        assert out.shape == (2, L, 2)
        loss_sum, count, report = sdar_loss(out, batch)
        assert set(report) == {"lm loss", "masked ce", "masked acc", "mean t"}
        again = sdar_loss(out, batch, ar_weight=0.0)
        assert torch.equal(again[0], loss_sum) and int(again[1]) == int(count)
        (loss_sum / count).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)

        hidden = model.decode(batch.input_ids, batch.position_ids, batch.layout)
        logits = model.output_layer(hidden[:L], weight=None)[0]
        ce = model.compute_language_model_loss(batch.labels, logits)
        correct = vocab_parallel_correct(logits.detach(), batch.labels, None)
        reference = torch.stack([ce, correct.to(ce.dtype)], dim=-1)
        # the whole noised half: bit for bit; its masked rows only: the same to rounding (other shapes)
        same = partial(torch.testing.assert_close, rtol=1e-5, atol=1e-7) if selected else _identical
        if selected:
            reference = reference * batch.masked[..., None]
        same(out, reference)
        ref_sum, ref_count, _ = sdar_loss(reference, batch)
        (ref_sum / ref_count).backward()
        for name, p in model.named_parameters():
            same(p.grad, grads[name])
        model.zero_grad(set_to_none=True)

        with torch.no_grad():
            both = model_call(model, batch, selected=selected)
        assert both.shape == (2, L, 4) and torch.equal(both[..., :2], out.detach())
        assert torch.equal(sdar_loss(both, batch)[0], loss_sum.detach())  # W = 0 ignores the AR columns


def _identical(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert torch.equal(actual, expected)


def test_ar_output_on_target_positions_equals_the_whole_clean_half(megatron_world):
    model = tiny_model(CAUSAL, vocab_size=VOCAB, seq_length=L, seed=6)
    batch = sample_batch(seed=4)
    grads = []
    for selected in (False, True):
        out = model_call(model, batch, selected=selected)
        loss_sum, count, report = sdar_loss(out, batch, ar_weight=1.0)
        (loss_sum / count).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        model.zero_grad(set_to_none=True)
        if not selected:
            whole, whole_report = out.detach(), report
    _, valid = next_token_targets(batch.labels, batch.layout, batch.eligible)
    torch.testing.assert_close(out.detach()[..., 2:] * valid[..., None], whole[..., 2:] * valid[..., None])
    for key in ("lm loss", "ar loss", "ar acc", "diffusion loss"):
        torch.testing.assert_close(report[key], whole_report[key])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


def test_settings(monkeypatch):
    from megatron_sdar.training.arguments import sdar_config_from_args, validate_sdar_args
    from tests.test_training import parse

    flags = ["--sdar-ar-loss-weight", "0.5"]
    with pytest.raises(ValueError, match="--sdar-clean-attention causal"):
        validate_sdar_args(parse(flags, monkeypatch), vocab_size=128)
    args = parse([*flags, "--sdar-clean-attention", "causal"], monkeypatch)
    validate_sdar_args(args, vocab_size=128)
    assert sdar_config_from_args(args).ar_loss_weight == 0.5
    assert sdar_config_from_args(parse([], monkeypatch)).ar_loss_weight == 0.0
    for extra, message in (
        (["--sdar-document-mask", "global"], "keeps no document boundaries"),
        (["--sdar-objective", "ar"], "--sdar-objective ar trains that alone"),
    ):
        with pytest.raises(ValueError, match=message):
            args = parse([*flags, "--sdar-clean-attention", "causal", *extra], monkeypatch)
            validate_sdar_args(args, vocab_size=128)
    problems = SDARConfig(mask_token_id=1, ar_loss_weight=-1.0).problems(16)
    assert problems == ["--sdar-ar-loss-weight must be >= 0 (0 = off), got -1.0"]


def test_flops_count_the_clean_output_layer():
    from megatron_sdar.training.flops import ModelShape, sdar_step_flops

    shape = ModelShape(2, 64, 4, 2, 16, 128, vocab_size=VOCAB)
    layout = sample_batch().layout
    without = sdar_step_flops(shape, layout, "causal")
    with_ar = sdar_step_flops(shape, layout, "causal", ar_output_tokens=25)
    assert with_ar - without == 3 * 25 * 2 * 64 * VOCAB


def test_forward_step_adds_the_ar_loss_only_with_a_weight(megatron_world, monkeypatch):
    """``SDARForwardStep`` under Megatron's global args: weight 0 calls the model as before; a weight
    passes the next-token targets (and their index under masked output positions) and the loss logs
    both parts."""
    import megatron.training.global_vars as global_vars
    from megatron.core.timers import Timers

    from megatron_sdar.training.step import SDARForwardStep

    calls = []

    class Recorder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, *args, **kwargs):
            calls.append(sorted(k for k, v in kwargs.items() if v is not None))
            return self.model(*args, **kwargs)

    model = Recorder(tiny_model(CAUSAL, vocab_size=VOCAB, seq_length=L, seed=7))
    batch = sample_batch(seed=8)
    monkeypatch.setattr(global_vars, "_GLOBAL_TIMERS", Timers(0, "minmax"))
    results = {}
    for weight, positions in ((0.0, "masked"), (0.5, "masked"), (0.5, "noised")):
        args = types.SimpleNamespace(
            sdar_objective="sdar", sdar_output_positions=positions, sdar_ar_loss_weight=weight,
            micro_batch_size=2, seq_length=L, sdar_loss_normalizer="eligible",
        )  # fmt: skip
        monkeypatch.setattr(global_vars, "_GLOBAL_ARGS", args)
        data = iter([{f.name: getattr(batch, f.name) for f in BATCH_FIELDS}])
        output, loss_fn = SDARForwardStep()(data, model)
        results[(weight, positions)] = loss_fn(output)
    assert calls[0] == ["labels", "layout_host", "loss_index"]
    assert calls[1] == ["ar_index", "ar_labels", "labels", "layout_host", "loss_index"]
    assert calls[2] == ["ar_labels", "labels", "layout_host"]
    plain = results[(0.0, "masked")][2]
    assert "ar loss" not in plain and "data tokens/s" in plain
    for key in ((0.5, "masked"), (0.5, "noised")):
        loss_sum, count, report = results[key]
        torch.testing.assert_close(report["diffusion loss"], plain["lm loss"])
        assert float(report["lm loss"][0]) > float(plain["lm loss"][0])
    torch.testing.assert_close(results[(0.5, "masked")][0], results[(0.5, "noised")][0])


def test_evaluation_scores_equal_the_training_losses(megatron_world):
    """On a model with a token-causal clean half: the evaluation's next-token NLL (causal mask, the
    decoding back end) is the training AR loss, and its diffusion bound is the training diffusion
    loss with that clean attention."""
    from megatron_sdar.evaluation import diffusion_bound, next_token_nll
    from megatron_sdar.inference import MegatronBackend

    model = tiny_model(CAUSAL, vocab_size=VOCAB, seq_length=L, seed=8).eval()
    gen = torch.Generator().manual_seed(9)
    windows = torch.randint(2, VOCAB - 1, (2, L), generator=gen)
    windows[0, 6] = windows[1, 11] = EOD
    backend = MegatronBackend(model, VOCAB)
    nll = next_token_nll(backend, windows, EOD)
    bound = diffusion_bound(backend, windows, EOD, CAUSAL, seed=3)
    ar_sum = ar_count = diffusion_sum = diffusion_count = 0.0
    noise = torch.Generator().manual_seed(3)  # the bound's noise, drawn in the same order
    with torch.no_grad():
        for row in windows.split(1):
            doc_ids = document_ids_from_eod(row, EOD)
            batch = build_sdar_batch(row, doc_ids, torch.ones_like(row, dtype=torch.bool), CAUSAL, noise)
            _, _, report = sdar_loss(model_call(model, batch), batch, ar_weight=1.0)
            ar_sum += float(report["ar loss"][0])
            ar_count += float(report["ar loss"][1])
            diffusion_sum += float(report["diffusion loss"][0])
            diffusion_count += float(report["diffusion loss"][1])
    assert nll["tokens"] == ar_count == 2 * (L - 1) - 2
    assert nll["nll"] == pytest.approx(ar_sum / ar_count, rel=1e-5)
    assert bound["diffusion_bound"] == pytest.approx(diffusion_sum / diffusion_count, rel=1e-5)


def test_an_export_is_scored_and_decoded_both_ways(tmp_path, monkeypatch):
    """A Megatron SDAR checkpoint with a token-causal clean half, exported to HF: ``tools/generate.py
    --mode ar`` decodes the greedy continuation of the Megatron clean half (what the AR loss trains),
    and ``tools/evaluate.py --text-metrics diffusion ar`` reports both scores, the NLL that of the
    checkpoint's clean half under the training layout."""
    from transformers import AutoTokenizer

    import megatron_sdar.config as config_module
    from megatron_sdar.inference.loading import load_megatron_model
    from tests.helpers import sdar_export
    from tools import evaluate as evaluate_tool
    from tools import generate as generate_tool

    _, export, mask_id = sdar_export(tmp_path)
    monkeypatch.setattr(config_module, "SDARConfig", partial(SDARConfig, clean_attention="causal"))
    model, arch, _ = load_megatron_model(str(tmp_path / "ckpt"))
    monkeypatch.undo()
    sdar = model.sdar_config
    assert sdar.clean_attention.value == "causal" and sdar.mask_token_id == mask_id
    tokenizer = AutoTokenizer.from_pretrained(export)

    def megatron_ar(tokens: list[int], steps: int) -> list[int]:
        out = []
        for _ in range(steps):
            seq = tokens + out
            n = -(-len(seq) // sdar.block_size) * sdar.block_size
            row = torch.tensor([seq + [seq[-1]] * (n - len(seq))])  # padded: later tokens are unseen
            layout = make_layout(torch.zeros_like(row), sdar.block_size, "document")
            position_ids = torch.arange(n).repeat(2)[None]
            with torch.no_grad():
                hidden = model.decode(torch.cat([row, row], 1), position_ids, layout)
                logits = model.output_layer(hidden[n:], weight=None)[0][len(seq) - 1, 0].float()
            logits[arch.vocab_size :] = float("-inf")
            logits[mask_id] = float("-inf")
            out.append(int(logits.argmax()))
            if out[-1] == tokenizer.eos_token_id:
                break
        return out

    prompt = "the mask token"
    decoded = generate_tool.main(
        ["--hf-dir", str(export), "--prompt", prompt, "--mode", "ar", "--max-new-tokens", "6"]
    )
    assert decoded["tokens"][0] == megatron_ar(tokenizer(prompt).input_ids, 6)

    text = tmp_path / "text.txt"
    text.write_text("the mask token is new\nblocks decode in parallel\n" * 4)
    flags = ["--hf-dir", str(export), "--text", str(text), "--text-unit", "line", "--seq-length", "16"]
    report = evaluate_tool.main([*flags, "--text-metrics", "diffusion", "ar", "--clean-attention", "causal"])
    scores = report["text"]
    assert {"diffusion_bound", "masked_ce", "tokens", "nll", "perplexity", "nll_tokens"} == set(scores)
    alone = evaluate_tool.main([*flags, "--text-metrics", "ar"])["text"]
    assert alone["nll"] == pytest.approx(scores["nll"]) and alone["tokens"] == scores["nll_tokens"]

    eod = tokenizer.eos_token_id
    windows, _ = evaluate_tool.text_windows(str(text), tokenizer, 16, 16, eod, "line")
    ar_sum = ar_count = 0.0
    with torch.no_grad():
        for row in windows:
            row = row[None]
            doc_ids = document_ids_from_eod(row, eod)
            eligible = torch.ones_like(row, dtype=torch.bool)
            short = -row.shape[1] % sdar.block_size  # a short last window: a padding document
            row = torch.cat([row, row.new_full((1, short), eod)], 1)
            doc_ids = torch.cat([doc_ids, doc_ids.new_full((1, short), int(doc_ids.max()) + 1)], 1)
            eligible = torch.cat([eligible, eligible.new_zeros(1, short)], 1)
            batch = build_sdar_batch(row, doc_ids, eligible, sdar, torch.Generator().manual_seed(0))
            targets, valid = next_token_targets(batch.labels, batch.layout, batch.eligible)
            # the training forward's clean half; the softmax over the real vocabulary, as the HF export's
            # (training's also covers the rows that pad the vocabulary for tensor parallelism)
            logits = clean_logits(model, batch.input_ids, batch)[:, 0, : arch.vocab_size]
            ce = F.cross_entropy(logits, targets[0], reduction="none")
            ar_sum += float((ce * valid[0]).sum())
            ar_count += float(valid.sum())
    assert scores["nll_tokens"] == ar_count
    assert scores["nll"] == pytest.approx(ar_sum / ar_count, rel=1e-4)


def test_tensor_and_sequence_parallel_match_one_process(tmp_path):
    """TP=2 with sequence parallelism, the output layer on the masked and the target positions only,
    tied embeddings: loss and gradients of the joint loss equal one process over the whole halves."""
    from tests.test_parallel import _run_parallel, _run_reference

    extra = ["--sp", "--tied", "--masked-output", "--clean-attention", "causal", "--ar-loss-weight", "0.5"]
    reference = _run_reference(tmp_path / "ref.pt", extra)
    results = _run_parallel(tmp_path / "ref.pt", 2, 1, extra)
    for result in results:
        assert result["failures"] == [], result
    assert [r["loss"] for r in results if "loss" in r] == pytest.approx([reference["loss"]] * 2, rel=1e-5)
