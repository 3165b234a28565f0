"""SDAR attention mask: the library's dense, FlexAttention ``mask_mod`` and ``BlockMask`` forms against an
independent brute-force reference written from the rules in the method note.

The reference knows nothing of the library: it takes document lengths, derives document membership and
block indices itself, and loops over every (query, key) pair of the 2L sequence ``[x_t ; x_0]``.
"""

from __future__ import annotations

import random

import pytest
import torch

from megatron_sdar.attention.flex import build_block_mask
from megatron_sdar.masks import (
    dense_sdar_mask,
    document_ids_from_eod,
    document_ids_from_lengths,
    make_layout,
    sdar_mask_mod,
)

BLOCK_SIZES = [1, 2, 3, 4, 5, 8, 16, 32, 64]
COUNTINGS = ["document", "window"]
VARIANTS = ["block_causal", "causal"]


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------


def reference_mask(lengths: list[int], block_size: int, counting: str, variant: str) -> torch.Tensor:
    """``[2L, 2L]`` boolean mask (true = may attend) from plain loops over all pairs."""
    seq = sum(lengths)
    doc_of: list[int] = []
    pos_in_doc: list[int] = []
    for d, n in enumerate(lengths):
        for j in range(n):
            doc_of.append(d)
            pos_in_doc.append(j)
    if counting == "document":
        blk = [pos_in_doc[i] // block_size for i in range(seq)]
    elif counting == "window":
        blk = [i // block_size for i in range(seq)]
    else:
        raise AssertionError(counting)

    rows = []
    for q in range(2 * seq):
        q_noised = q < seq
        qi = q if q_noised else q - seq
        row = []
        for k in range(2 * seq):
            k_noised = k < seq
            ki = k if k_noised else k - seq
            if doc_of[qi] != doc_of[ki]:
                allowed = False
            elif q_noised and k_noised:
                allowed = blk[ki] == blk[qi]
            elif q_noised and not k_noised:
                allowed = blk[ki] < blk[qi]
            elif not q_noised and not k_noised:
                if variant == "block_causal":
                    allowed = blk[ki] <= blk[qi]
                elif variant == "causal":
                    allowed = ki <= qi
                else:
                    raise AssertionError(variant)
            else:  # clean query, noised key
                allowed = False
            row.append(allowed)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool)


def random_lengths(rng: random.Random, total: int, max_len: int) -> list[int]:
    lengths = []
    while sum(lengths) < total:
        lengths.append(min(rng.randint(1, max_len), total - sum(lengths)))
    return lengths


def layouts_for(block_size: int, seq: int, rng: random.Random) -> list[list[int]]:
    """Document layouts of one window: one document, all length 1, random unaligned, mixed."""
    mixed = []
    while sum(mixed) < seq:
        n = block_size * rng.randint(1, 3) if rng.random() < 0.5 else rng.randint(1, block_size + 2)
        mixed.append(min(n, seq - sum(mixed)))
    return [
        [seq],
        [1] * seq,
        random_lengths(rng, seq, max(2, 2 * block_size + 3)),
        mixed,
    ]


def window_length(block_size: int) -> int:
    """A window length that is a multiple of the block size, at most 128 and at least two blocks."""
    return max(2 * block_size, (128 // block_size) * block_size if block_size > 4 else 48)


def all_pairs(mask_mod, batch: int, length: int) -> torch.Tensor:
    """Evaluate a FlexAttention ``mask_mod`` on every (b, q, kv) with broadcast index tensors."""
    b = torch.arange(batch)[:, None, None]
    h = torch.zeros((), dtype=torch.int64)
    q = torch.arange(length)[None, :, None]
    kv = torch.arange(length)[None, None, :]
    return mask_mod(b, h, q, kv).expand(batch, length, length)


def layout_from_lengths(rows: list[list[int]], block_size: int, counting: str) -> torch.Tensor:
    doc_ids = torch.stack([document_ids_from_lengths(lengths) for lengths in rows])
    return make_layout(doc_ids, block_size, counting)


# --------------------------------------------------------------------------------------------------
# The reference itself, on a case small enough to read
# --------------------------------------------------------------------------------------------------


def test_reference_on_a_hand_case():
    # One document of 4 tokens, B = 2: blocks [0, 0, 1, 1].
    T, F = True, False
    expected = [
        # noised keys 0-3   clean keys 0-3
        [T, T, F, F, F, F, F, F],  # noised q0 (block 0)
        [T, T, F, F, F, F, F, F],  # noised q1
        [F, F, T, T, T, T, F, F],  # noised q2 (block 1): own block + clean block 0
        [F, F, T, T, T, T, F, F],  # noised q3
        [F, F, F, F, T, T, F, F],  # clean q0: clean block 0
        [F, F, F, F, T, T, F, F],  # clean q1
        [F, F, F, F, T, T, T, T],  # clean q2: clean blocks 0-1
        [F, F, F, F, T, T, T, T],  # clean q3
    ]
    assert reference_mask([4], 2, "document", "block_causal").tolist() == expected
    causal = reference_mask([4], 2, "document", "causal")
    assert causal[4:, 4:].tolist() == [[k <= q for k in range(4)] for q in range(4)]
    # Two documents never see each other.
    two = reference_mask([2, 2], 2, "document", "block_causal")
    for q in range(8):
        for k in range(8):
            if (q % 4 < 2) != (k % 4 < 2):
                assert not two[q, k]


# --------------------------------------------------------------------------------------------------
# Dense mask and mask_mod against the reference
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("counting", COUNTINGS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_dense_mask_and_mask_mod_match_reference(block_size, counting, variant):
    seq = window_length(block_size)
    assert seq % block_size == 0 and seq <= 128
    rng = random.Random(1000 * block_size + 10 * COUNTINGS.index(counting) + VARIANTS.index(variant))
    rows = layouts_for(block_size, seq, rng)
    layout = layout_from_lengths(rows, block_size, counting)
    assert layout.shape == (len(rows), 2, seq)

    dense = dense_sdar_mask(layout, variant)
    assert dense.shape == (len(rows), 1, 2 * seq, 2 * seq) and dense.dtype == torch.bool
    from_mod = all_pairs(sdar_mask_mod(layout, variant), len(rows), 2 * seq)

    for r, lengths in enumerate(rows):
        ref = reference_mask(lengths, block_size, counting, variant)
        assert torch.equal(dense[r, 0], ref), f"dense mask differs for lengths {lengths}"
        assert torch.equal(from_mod[r], ref), f"mask_mod differs for lengths {lengths}"
        # Every query may attend to at least one key (no all-masked softmax rows).
        assert ref.any(dim=-1).all()
        assert dense[r, 0].any(dim=-1).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_mask_mod_matches_reference_one_row_at_a_time(variant):
    """The mask function called per batch row with scalar ``b`` (as FlexAttention's vmap does)."""
    rng = random.Random(7)
    block_size, seq = 4, 36
    rows = [random_lengths(rng, seq, 9) for _ in range(3)]
    layout = layout_from_lengths(rows, block_size, "document")
    mask_mod = sdar_mask_mod(layout, variant)
    idx = torch.arange(2 * seq)
    for r, lengths in enumerate(rows):
        got = mask_mod(torch.tensor(r), torch.tensor(0), idx[:, None], idx[None, :])
        assert torch.equal(got, reference_mask(lengths, block_size, "document", variant))


def test_counting_modes_differ_on_unaligned_documents():
    """Block counting matters once a document does not start on a window block boundary."""
    lengths = [3, 9]
    layout_doc = layout_from_lengths([lengths], 4, "document")
    layout_win = layout_from_lengths([lengths], 4, "window")
    assert layout_doc[0, 1].tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2]
    assert layout_win[0, 1].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert layout_doc[0, 0].tolist() == [0] * 3 + [1] * 9
    assert not torch.equal(
        dense_sdar_mask(layout_doc, "block_causal"), dense_sdar_mask(layout_win, "block_causal")
    )


def test_variants_differ_only_in_the_clean_half():
    layout = layout_from_lengths([[5, 11]], 4, "document")
    block_causal = dense_sdar_mask(layout, "block_causal")[0, 0]
    causal = dense_sdar_mask(layout, "causal")[0, 0]
    seq = 16
    assert torch.equal(block_causal[:seq], causal[:seq])
    assert torch.equal(block_causal[:, :seq], causal[:, :seq])
    assert not torch.equal(block_causal[seq:, seq:], causal[seq:, seq:])
    # Token-causal is strictly contained in block-causal.
    assert not (causal & ~block_causal).any()


# --------------------------------------------------------------------------------------------------
# Document ids
# --------------------------------------------------------------------------------------------------


def test_document_ids_from_eod_hand_case():
    eod = 0
    tokens = torch.tensor(
        [
            [5, 7, 0, 3, 0, 0, 9, 8],
            [1, 2, 3, 4, 5, 6, 7, 0],
        ]
    )
    assert document_ids_from_eod(tokens, eod).tolist() == [
        [0, 0, 0, 1, 1, 2, 3, 3],  # each EOD belongs to the document it closes
        [0, 0, 0, 0, 0, 0, 0, 0],
    ]
    # A window that starts with an EOD: a one-token document.
    assert document_ids_from_eod(torch.tensor([[0, 4, 4, 0]]), eod).tolist() == [[0, 1, 1, 1]]


def test_document_ids_from_lengths():
    assert document_ids_from_lengths([2, 1, 3]).tolist() == [0, 0, 1, 2, 2, 2]
    with pytest.raises(ValueError):
        document_ids_from_lengths([2, 0, 3])


def test_eod_document_ids_give_the_reference_mask():
    eod = 0
    tokens = torch.tensor([[4, 4, 4, 0, 5, 5, 5, 5, 5, 0, 6, 0, 7, 7, 7, 7]])
    layout = make_layout(document_ids_from_eod(tokens, eod), 4, "document")
    ref = reference_mask([4, 6, 2, 4], 4, "document", "block_causal")
    assert torch.equal(dense_sdar_mask(layout, "block_causal")[0, 0], ref)


# --------------------------------------------------------------------------------------------------
# BlockMask
# --------------------------------------------------------------------------------------------------


def tiles_from_indices(num_blocks: torch.Tensor, indices: torch.Tensor, n_cols: int) -> torch.Tensor:
    """Boolean ``[b, h, rows, n_cols]`` tile grid from a (num_blocks, indices) pair."""
    b, h, rows = num_blocks.shape
    grid = torch.zeros(b, h, rows, n_cols, dtype=torch.bool)
    for i in range(b):
        for j in range(h):
            for r in range(rows):
                cols = indices[i, j, r, : int(num_blocks[i, j, r])].tolist()
                assert len(set(cols)) == len(cols), "duplicate tile index"
                grid[i, j, r, cols] = True
    return grid


@pytest.mark.parametrize(
    "rows,block_size,counting,variant",
    [
        ([[40], [7, 13, 1, 19], [1] * 40], 4, "document", "block_causal"),
        ([[3, 29, 8], [16, 16, 8]], 8, "window", "causal"),
        ([[44], [5] * 8 + [4]], 4, "document", "causal"),  # 2L = 88: last tile is partial
        ([[64], [33, 31]], 32, "document", "block_causal"),
    ],
)
def test_block_mask_tiles_agree_with_dense_mask(rows, block_size, counting, variant):
    tile = 16
    layout = layout_from_lengths(rows, block_size, counting)
    batch, _, seq = layout.shape
    dense = dense_sdar_mask(layout, variant)[:, 0]
    for r, lengths in enumerate(rows):
        assert torch.equal(dense[r], reference_mask(lengths, block_size, counting, variant))

    bm = build_block_mask(layout, variant, block=tile, compile=False)
    n_tiles = -(-2 * seq // tile)
    assert bm.BLOCK_SIZE == (tile, tile)
    assert bm.seq_lengths == (2 * seq, 2 * seq)
    assert bm.kv_num_blocks.shape == (batch, 1, n_tiles)
    assert bm.full_kv_num_blocks is not None

    partial = tiles_from_indices(bm.kv_num_blocks, bm.kv_indices, n_tiles)[:, 0]
    full = tiles_from_indices(bm.full_kv_num_blocks, bm.full_kv_indices, n_tiles)[:, 0]
    assert not (partial & full).any(), "a tile is both partial and full"
    assert torch.equal(bm.to_dense()[:, 0].bool(), partial | full)

    saw = {"empty": 0, "partial": 0, "full": 0}
    for r in range(batch):
        for qt in range(n_tiles):
            for kt in range(n_tiles):
                q0, q1 = qt * tile, min((qt + 1) * tile, 2 * seq)
                k0, k1 = kt * tile, min((kt + 1) * tile, 2 * seq)
                inside = dense[r, q0:q1, k0:k1]
                if full[r, qt, kt]:
                    assert inside.all(), f"tile ({qt}, {kt}) marked full but has masked pairs"
                    saw["full"] += 1
                elif partial[r, qt, kt]:
                    assert inside.any(), f"tile ({qt}, {kt}) marked partial but has no allowed pair"
                    saw["partial"] += 1
                else:
                    assert not inside.any(), f"tile ({qt}, {kt}) skipped but has allowed pairs"
                    saw["empty"] += 1
                # Tiles that cover a whole 16 x 16 area of allowed pairs are recorded as full.
                if inside.shape == (tile, tile) and inside.all():
                    assert full[r, qt, kt]
    assert saw["empty"] > 0 and saw["partial"] > 0

    # The column-major view used by the backward pass is the transpose of the row-major one.
    q_partial = tiles_from_indices(bm.q_num_blocks, bm.q_indices, n_tiles)[:, 0]
    q_full = tiles_from_indices(bm.full_q_num_blocks, bm.full_q_indices, n_tiles)[:, 0]
    assert torch.equal(q_partial, partial.transpose(-1, -2))
    assert torch.equal(q_full, full.transpose(-1, -2))

    # The BlockMask carries the element-level mask function.
    assert torch.equal(all_pairs(bm.mask_mod, batch, 2 * seq), dense)


# --------------------------------------------------------------------------------------------------
# Density
# --------------------------------------------------------------------------------------------------


def expected_allowed_one_document(seq: int, block_size: int, variant: str) -> int:
    """Exact number of allowed pairs for one document filling the window (block counting irrelevant)."""
    n = seq // block_size
    noised_noised = n * block_size * block_size
    noised_clean = block_size * block_size * n * (n - 1) // 2  # query block j sees j earlier blocks
    if variant == "block_causal":
        clean_clean = block_size * block_size * n * (n + 1) // 2
    else:
        clean_clean = seq * (seq + 1) // 2
    return noised_noised + noised_clean + clean_clean


@pytest.mark.parametrize("seq,block_size", [(12, 3), (40, 8), (64, 1), (64, 64)])
def test_density_formula_matches_reference(seq, block_size):
    for variant in VARIANTS:
        ref = reference_mask([seq], block_size, "document", variant)
        assert int(ref.sum()) == expected_allowed_one_document(seq, block_size, variant)


def test_density_of_a_long_single_document_window():
    seq, block_size = 4096, 4
    layout = make_layout(document_ids_from_lengths([seq]).unsqueeze(0), block_size, "document")
    dense = dense_sdar_mask(layout, "block_causal")
    allowed = int(dense.sum())
    del dense
    expected = expected_allowed_one_document(seq, block_size, "block_causal")
    assert expected == seq * seq + seq * block_size
    assert allowed == expected
    # Element density: 1/4 + B / (4L), just above a quarter (causal attention over 2L is one half).
    assert allowed / (2 * seq) ** 2 == pytest.approx(0.25 + block_size / (4 * seq), abs=0)

    # At FlexAttention's 128 x 128 tiles about 27% of the tiles must be visited: per half n = L/128
    # tile rows; noised-noised: the n diagonal tiles; noised-clean: tiles on and below the diagonal
    # (a tile holds several SDAR blocks); clean-clean: tiles on and below the diagonal.
    tile = 128
    n = seq // tile
    expected_tiles = n + n * (n + 1) // 2 + n * (n + 1) // 2
    bm = build_block_mask(layout, "block_causal", block=tile, compile=False)
    visited = int(bm.kv_num_blocks.sum()) + int(bm.full_kv_num_blocks.sum())
    assert visited == expected_tiles
    assert visited / (2 * n) ** 2 == pytest.approx(0.27, abs=0.005)


def test_bad_lengths_and_block_size_are_rejected():
    with pytest.raises(ValueError, match="positive"):
        document_ids_from_lengths([3, 0])
    with pytest.raises(ValueError, match="block size"):
        make_layout(torch.zeros(1, 8, dtype=torch.int32), 0, "document")
