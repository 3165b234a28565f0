"""The SDAR mask (dense and FlexAttention forms) against a brute-force reference written from the
rules, over random packed-document layouts, block sizes 1..64, both block-counting modes and both
clean-half variants."""

from __future__ import annotations

import random

import pytest
import torch

from megatron_sdar.masks import (
    build_block_mask,
    dense_sdar_mask,
    document_ids_from_eod,
    document_ids_from_lengths,
    make_layout,
    sdar_mask_mod,
)


def reference_mask(lengths: list[int], block: int, counting: str, clean: str) -> list[list[bool]]:
    """Plain loops over all (query, key) pairs of [x_t ; x_0], straight from the rules."""
    seq = sum(lengths)
    doc, pos_in_doc = [], []
    for d, n in enumerate(lengths):
        doc += [d] * n
        pos_in_doc += list(range(n))
    blk = [(pos_in_doc[i] if counting == "document" else i) // block for i in range(seq)]
    mask = [[False] * (2 * seq) for _ in range(2 * seq)]
    for q in range(2 * seq):
        for k in range(2 * seq):
            q_noised, k_noised = q < seq, k < seq
            qi, ki = q % seq, k % seq
            if doc[qi] != doc[ki]:
                continue
            if q_noised and k_noised:
                ok = blk[qi] == blk[ki]
            elif q_noised and not k_noised:
                ok = blk[ki] < blk[qi]
            elif not q_noised and not k_noised:
                ok = blk[ki] <= blk[qi] if clean == "block_causal" else ki <= qi
            else:
                ok = False
            mask[q][k] = ok
    return mask


def random_lengths(rng: random.Random, seq: int) -> list[int]:
    style = rng.choice(["one", "tiny", "mixed"])
    if style == "one":
        return [seq]
    lengths = []
    while sum(lengths) < seq:
        n = 1 if style == "tiny" and rng.random() < 0.7 else rng.randint(1, max(1, seq // 2))
        lengths.append(min(n, seq - sum(lengths)))
    return lengths


CASES = [
    (b, seq)
    for b, seq in [(1, 12), (2, 16), (3, 24), (4, 32), (5, 40), (8, 48), (16, 64), (32, 64), (64, 128)]
]


@pytest.mark.parametrize("block, seq", CASES)
@pytest.mark.parametrize("counting", ["document", "window"])
@pytest.mark.parametrize("clean", ["block_causal", "causal"])
def test_dense_and_flex_masks_match_reference(block, seq, counting, clean):
    rng = random.Random(hash((block, seq, counting, clean)) % 10_000)
    layouts = [random_lengths(rng, seq) for _ in range(2)]
    doc_ids = torch.stack([document_ids_from_lengths(lengths) for lengths in layouts])
    layout = make_layout(doc_ids, block, counting)
    dense = dense_sdar_mask(layout, clean)
    assert dense.shape == (2, 1, 2 * seq, 2 * seq)
    mask_mod = sdar_mask_mod(layout, clean)
    idx = torch.arange(2 * seq)
    for row, lengths in enumerate(layouts):
        expected = torch.tensor(reference_mask(lengths, block, counting, clean))
        assert torch.equal(dense[row, 0], expected), (lengths, block, counting, clean)
        flex = mask_mod(torch.tensor(row), torch.tensor(0), idx[:, None], idx[None, :])
        assert torch.equal(flex, expected)
        assert expected.any(dim=1).all()  # every query sees at least itself: no empty softmax rows


@pytest.mark.parametrize("clean", ["block_causal", "causal"])
def test_block_mask_tiles_agree_with_dense_mask(clean):
    rng = random.Random(0)
    seq, tile = 96, 16
    doc_ids = torch.stack([document_ids_from_lengths(random_lengths(rng, seq)) for _ in range(2)])
    layout = make_layout(doc_ids, 4, "document")
    dense = dense_sdar_mask(layout, clean)[:, 0]
    block_mask = build_block_mask(layout, clean, block=tile, compile=False)
    n = 2 * seq // tile
    for b in range(2):
        partial_tiles = torch.zeros(n, n, dtype=torch.bool)
        full_tiles = torch.zeros(n, n, dtype=torch.bool)
        for q in range(n):
            for j in range(int(block_mask.kv_num_blocks[b, 0, q])):
                partial_tiles[q, int(block_mask.kv_indices[b, 0, q, j])] = True
            if block_mask.full_kv_num_blocks is not None:
                for j in range(int(block_mask.full_kv_num_blocks[b, 0, q])):
                    full_tiles[q, int(block_mask.full_kv_indices[b, 0, q, j])] = True
        tiles = dense[b].reshape(n, tile, n, tile).permute(0, 2, 1, 3)
        any_allowed = tiles.flatten(2).any(-1)
        all_allowed = tiles.flatten(2).all(-1)
        # Skipped tiles hold no allowed pair; "full" tiles are entirely allowed; every tile with an
        # allowed pair is visited.
        assert not (any_allowed & ~(partial_tiles | full_tiles)).any()
        assert all_allowed[full_tiles].all()
        assert not (partial_tiles & full_tiles).any()
        idx = torch.arange(2 * seq)
        evaluated = block_mask.mask_mod(torch.tensor(b), torch.tensor(0), idx[:, None], idx[None, :])
        assert torch.equal(evaluated, dense[b])


def test_density_single_document():
    """At B=4 the mask allows L^2 (1 + B/L) of the (2L)^2 pairs, about 25% (causal over 2L: ~50%)."""
    seq, block = 4096, 4
    layout = make_layout(torch.zeros(1, seq, dtype=torch.int32), block, "document")
    allowed = int(dense_sdar_mask(layout, "block_causal").sum())
    nb = seq // block
    # noised->noised: nb blocks of B^2; noised->clean: sum_b b*B*B; clean->clean: sum_b (b+1)*B*B
    expected = nb * block**2 + block**2 * (nb * (nb - 1) // 2) + block**2 * (nb * (nb + 1) // 2)
    assert allowed == expected
    assert expected == seq * seq + seq * block
    assert 0.25 <= allowed / (2 * seq) ** 2 < 0.2505


def test_document_ids_from_eod():
    eod = 1
    tokens = torch.tensor([[5, 6, 1, 7, 1, 1, 8, 9], [1, 2, 3, 4, 5, 6, 7, 1]])
    assert document_ids_from_eod(tokens, eod).tolist() == [[0, 0, 0, 1, 1, 2, 3, 3], [0, 1, 1, 1, 1, 1, 1, 1]]


def test_bad_lengths_and_block_size_are_rejected():
    with pytest.raises(ValueError, match="positive"):
        document_ids_from_lengths([3, 0])
    with pytest.raises(ValueError, match="block size"):
        make_layout(torch.zeros(1, 8, dtype=torch.int32), 0, "document")
