"""A tiny SDAR model learns, on CPU, a synthetic task whose masked tokens are predictable from context.

Each window packs several arithmetic progressions ``2 + (start + stride * i) % 60`` (random start,
stride 1-3, length 8-23), each closed by an end-of-document token. A masked token follows from the
clean tokens of earlier blocks of its document (the previous value and the stride) and from unmasked
neighbours in its own block, so the diffusion loss (Eq. 7) can fall far below its starting value only
if the noised half sees the right parts of the clean half. With the noised-to-clean attention cut,
the same training stays near half the starting loss and masked accuracy stays near 0.2-0.3; with the
mask intact it ends near a quarter of the starting loss and accuracy near 0.7.
"""

from __future__ import annotations

import time

import torch

from megatron_sdar.batch import SDARBatch, build_sdar_batch
from megatron_sdar.config import SDARConfig
from megatron_sdar.loss import next_token_targets, sdar_loss
from megatron_sdar.masks import document_ids_from_eod
from tests.helpers import tiny_model

VOCAB, EOD, MASK = 64, 1, 63  # data tokens are 1 (EOD) and 2..61; the mask token never occurs
L, B, ROWS = 64, 4, 8
STEPS = 400  # about 25-40 s on two CPU cores
VALUES = 60  # progression values 2..61: chance accuracy is about 1/60


def windows(gen: torch.Generator, rows: int) -> torch.Tensor:
    """``[rows, L]`` windows of packed progressions, each progression ended by EOD."""
    out = torch.empty(rows, L, dtype=torch.long)
    for r in range(rows):
        seq: list[int] = []
        while len(seq) < L:
            start = int(torch.randint(0, VALUES, (1,), generator=gen))
            stride = int(torch.randint(1, 4, (1,), generator=gen))
            length = int(torch.randint(8, 24, (1,), generator=gen))
            seq += [2 + (start + stride * i) % VALUES for i in range(length)] + [EOD]
        out[r] = torch.tensor(seq[:L])
    return out


def batch_of(tokens: torch.Tensor, sdar: SDARConfig, noise: torch.Generator) -> SDARBatch:
    doc_ids = document_ids_from_eod(tokens, EOD)
    eligible = torch.ones_like(tokens, dtype=torch.bool)
    return build_sdar_batch(tokens, doc_ids, eligible, sdar, noise)


def evaluate(model, held_out: list[torch.Tensor], sdar: SDARConfig) -> tuple[float, float]:
    """Diffusion loss (sum over batches / eligible tokens) and masked-token accuracy on fixed
    held-out windows under fixed noise."""
    model.eval()
    loss, count, hits, masked = 0.0, 0, 0.0, 0.0
    noise = torch.Generator().manual_seed(10_000)
    with torch.no_grad():
        for tokens in held_out:
            batch = batch_of(tokens, sdar, noise)
            out = model(batch.input_ids, batch.position_ids, batch.layout, labels=batch.labels)
            loss_sum, n, report = sdar_loss(out, batch)
            loss += loss_sum.item()
            count += int(n)
            hits += report["masked acc"][0].item()
            masked += report["masked acc"][1].item()
    model.train()
    return loss / count, hits / masked


def test_diffusion_loss_falls(megatron_world):
    sdar = SDARConfig(block_size=B, mask_token_id=MASK)
    shape = dict(num_layers=2, hidden_size=96, num_attention_heads=4, num_query_groups=2, kv_channels=24)
    model = tiny_model(sdar, vocab_size=VOCAB, seq_length=L, ffn_hidden_size=192, seed=0, **shape)
    held_out = [windows(torch.Generator().manual_seed(100 + i), ROWS) for i in range(4)]
    initial_loss, initial_acc = evaluate(model, held_out, sdar)

    data = torch.Generator().manual_seed(1)
    noise = torch.Generator().manual_seed(2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    start = time.perf_counter()
    for _ in range(STEPS):
        batch = batch_of(windows(data, ROWS), sdar, noise)
        out = model(batch.input_ids, batch.position_ids, batch.layout, labels=batch.labels)
        loss_sum, count, _ = sdar_loss(out, batch)
        optimizer.zero_grad(set_to_none=True)
        (loss_sum / count).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    seconds = time.perf_counter() - start

    final_loss, final_acc = evaluate(model, held_out, sdar)
    print(
        f"\ndiffusion loss {initial_loss:.3f} -> {final_loss:.3f} ({final_loss / initial_loss:.2f}x), "
        f"masked accuracy {initial_acc:.3f} -> {final_acc:.3f}, {STEPS} steps in {seconds:.1f} s"
    )
    assert final_loss < 0.4 * initial_loss, (initial_loss, final_loss)
    assert final_acc > 0.4, (initial_acc, final_acc)


JOINT_STEPS = 120  # the AR loss on the clean half: about 15-25 s on two CPU cores


def joint_scores(model, held_out: list[torch.Tensor], sdar: SDARConfig) -> tuple[float, float]:
    """Held-out diffusion loss and next-token NLL of the clean half (each over its own count)."""
    model.eval()
    sums = {"diffusion loss": [0.0, 0.0], "ar loss": [0.0, 0.0]}
    noise = torch.Generator().manual_seed(10_000)
    with torch.no_grad():
        for tokens in held_out:
            batch = batch_of(tokens, sdar, noise)
            targets, _ = next_token_targets(batch.labels, batch.layout, batch.eligible)
            out = model(
                batch.input_ids, batch.position_ids, batch.layout, labels=batch.labels, ar_labels=targets
            )
            report = sdar_loss(out, batch, ar_weight=1.0)[2]
            for key, pair in sums.items():
                pair[0] += report[key][0].item()
                pair[1] += report[key][1].item()
    model.train()
    return sums["diffusion loss"][0] / sums["diffusion loss"][1], sums["ar loss"][0] / sums["ar loss"][1]


def test_joint_ar_and_diffusion_losses_fall(megatron_world):
    """With ``--sdar-ar-loss-weight 0.5`` (token-causal clean half) the same tiny model learns both
    ways: the clean half's next-token NLL (the next value of a progression follows from the last two)
    and the noised half's diffusion loss fall together."""
    sdar = SDARConfig(block_size=B, mask_token_id=MASK, clean_attention="causal", ar_loss_weight=0.5)
    shape = dict(num_layers=2, hidden_size=96, num_attention_heads=4, num_query_groups=2, kv_channels=24)
    model = tiny_model(sdar, vocab_size=VOCAB, seq_length=L, ffn_hidden_size=192, seed=0, **shape)
    held_out = [windows(torch.Generator().manual_seed(100 + i), ROWS) for i in range(4)]
    initial_diffusion, initial_nll = joint_scores(model, held_out, sdar)

    data = torch.Generator().manual_seed(1)
    noise = torch.Generator().manual_seed(2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    start = time.perf_counter()
    for _ in range(JOINT_STEPS):
        batch = batch_of(windows(data, ROWS), sdar, noise)
        targets, _ = next_token_targets(batch.labels, batch.layout, batch.eligible)
        out = model(batch.input_ids, batch.position_ids, batch.layout, labels=batch.labels, ar_labels=targets)
        loss_sum, count, _ = sdar_loss(out, batch, ar_weight=sdar.ar_loss_weight)
        optimizer.zero_grad(set_to_none=True)
        (loss_sum / count).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    seconds = time.perf_counter() - start

    final_diffusion, final_nll = joint_scores(model, held_out, sdar)
    print(
        f"\ndiffusion loss {initial_diffusion:.3f} -> {final_diffusion:.3f}, next-token NLL "
        f"{initial_nll:.3f} -> {final_nll:.3f}, {JOINT_STEPS} steps in {seconds:.1f} s"
    )
    assert final_diffusion < 0.5 * initial_diffusion, (initial_diffusion, final_diffusion)
    assert final_nll < 0.3 * initial_nll, (initial_nll, final_nll)
