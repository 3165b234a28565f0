"""megatron_sdar.compat: the one home of private / version-fragile torch and megatron-core APIs."""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import io
import re
import tokenize
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_sdar import compat
from megatron_sdar.compat import UnsupportedVersionError

ROOT = Path(__file__).resolve().parent.parent

# What only compat.py may touch, as patterns over code with comments and strings blanked out.
PRIVATE_CODE = {
    "Tensor._version": r"\._version\b",
    "aten._flash_attention_forward": r"(?<!\w)_flash_attention_forward\b",
    "aten._flash_attention_backward": r"(?<!\w)_flash_attention_backward\b",
    "create_block_mask(_compile=...)": r"(?<!\w)_compile\s*=(?!=)",
    "GPTDataset._query_document_sample_shuffle_indices": r"(?<!\w)_query_document_sample_shuffle_indices\b",
    "GPTDataset._pad_token_id": r"(?<!\w)_pad_token_id\b",
    "torch.distributed.checkpoint.planner_helpers": r"\bplanner_helpers\b",
    "argparse parser._actions": r"\._actions\b",
    "assigning megatron's compile_helpers": r"\bcompile_helpers\s*=(?!=)",
}
# The same names reached through strings (getattr / setattr / importlib).
PRIVATE_STRINGS = {
    "_version",
    "_flash_attention_forward",
    "_flash_attention_backward",
    "_compile",
    "_query_document_sample_shuffle_indices",
    "_pad_token_id",
    "_actions",
    "compile_helpers",
}


def private_uses(source: str) -> list[str]:
    """``"line: what"`` for each private API ``source`` touches (comments and docstrings ignored)."""
    lines = source.splitlines(keepends=True)
    code = [list(line) for line in lines]
    found = []
    blank = {tokenize.COMMENT, tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", -1)}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in blank:
            continue
        if tok.type == tokenize.STRING:
            try:
                value = ast.literal_eval(tok.string)
            except (ValueError, SyntaxError):
                value = None
            if isinstance(value, str) and (
                value in PRIVATE_STRINGS or re.fullmatch(r"[\w.]*planner_helpers[\w.]*", value)
            ):
                found.append(f"{tok.start[0]}: string {value!r}")
        (r0, c0), (r1, c1) = tok.start, tok.end
        for row in range(r0, r1 + 1):
            chars = code[row - 1]
            start = c0 if row == r0 else 0
            end = c1 if row == r1 else len(chars)
            for col in range(start, end):
                if chars[col] != "\n":
                    chars[col] = " "
    for number, chars in enumerate(code, 1):
        text = "".join(chars)
        found += [f"{number}: {what}" for what, pat in PRIVATE_CODE.items() if re.search(pat, text)]
    return found


def scanned_files() -> list[Path]:
    files = [*(ROOT / "megatron_sdar").rglob("*.py"), ROOT / "pretrain_sdar.py"]
    for folder in ("tools", "benchmarks", "examples"):
        files += (ROOT / folder).glob("*.py")
    return sorted(f for f in files if f != ROOT / "megatron_sdar" / "compat.py")


def test_the_scanner_finds_private_uses_in_code_not_in_prose():
    source = '''"""Mentions ._version, _flash_attention_forward and parser._actions in prose only."""
import torch.distributed.checkpoint.planner_helpers as ph  # a comment on _compile=True
v = t._version
m = create_block_mask(f, 1, None, 2, 2, _compile=True)
x = getattr(ds, "_pad_token_id")
utils.compile_helpers = check
for a in parser._actions:
    s = f"{t._version} and _flash_attention_backward"
ok = args.sdar_sft_pad_token_id == 0 and compile_helpers == x
'''
    found = private_uses(source)
    assert found == [
        "5: string '_pad_token_id'",
        "2: torch.distributed.checkpoint.planner_helpers",
        "3: Tensor._version",
        "4: create_block_mask(_compile=...)",
        "6: assigning megatron's compile_helpers",
        "7: argparse parser._actions",
        "8: Tensor._version",
    ]


def test_only_compat_touches_private_apis():
    uses = {}
    for path in scanned_files():
        found = private_uses(path.read_text())
        if found:
            uses[str(path.relative_to(ROOT))] = found
    assert not uses, f"route these through megatron_sdar/compat.py: {uses}"


# --- version checks ----------------------------------------------------------------------------------


@pytest.fixture
def fresh_checks(monkeypatch):
    """Version checks run afresh (they are cached per feature), without the escape hatch."""
    monkeypatch.delenv(compat.ALLOW_UNTESTED, raising=False)
    compat.check_torch.cache_clear()
    compat.check_megatron_core.cache_clear()
    yield
    compat.check_torch.cache_clear()
    compat.check_megatron_core.cache_clear()


def fake_megatron_core(monkeypatch, release: str) -> None:
    real = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata, "version", lambda name: release if name == "megatron-core" else real(name)
    )


def test_installed_versions_are_the_supported_ones(fresh_checks):
    compat.check_torch("a feature")
    compat.check_megatron_core("a feature")


def test_other_torch_release_is_refused_naming_the_supported_one(monkeypatch, fresh_checks):
    monkeypatch.setattr(torch, "__version__", "2.99.0+cu999")
    with pytest.raises(UnsupportedVersionError) as err:
        compat.check_torch("the thing")
    message = str(err.value)
    assert f"torch {compat.SUPPORTED_TORCH}.x" in message
    assert "2.99.0+cu999" in message and "the thing" in message and compat.ALLOW_UNTESTED in message
    monkeypatch.setenv(compat.ALLOW_UNTESTED, "1")
    compat.check_torch("the thing")


def test_other_megatron_core_release_is_refused_naming_the_supported_one(monkeypatch, fresh_checks):
    fake_megatron_core(monkeypatch, "0.99.1")
    with pytest.raises(UnsupportedVersionError) as err:
        compat.check_megatron_core("the thing")
    message = str(err.value)
    assert f"megatron-core {compat.SUPPORTED_MEGATRON_CORE}.x" in message
    assert "0.99.1" in message and "the thing" in message and compat.ALLOW_UNTESTED in message
    # the wrappers check too
    with pytest.raises(UnsupportedVersionError, match=re.escape(compat.SUPPORTED_MEGATRON_CORE)):
        compat.escape_percent_in_help(argparse.ArgumentParser())
    monkeypatch.setenv(compat.ALLOW_UNTESTED, "1")
    compat.check_megatron_core("the thing")
    compat.escape_percent_in_help(argparse.ArgumentParser())


def test_a_patch_release_is_accepted(monkeypatch, fresh_checks):
    monkeypatch.setattr(torch, "__version__", f"{compat.SUPPORTED_TORCH}.7+cpu")
    fake_megatron_core(monkeypatch, f"{compat.SUPPORTED_MEGATRON_CORE}.9")
    compat.check_torch("the thing")
    compat.check_megatron_core("the thing")


# --- torch wrappers ----------------------------------------------------------------------------------


def test_flash_attention_wrappers_match_the_op_schemas():
    """The keyword names the wrappers pass are the installed ops' (meta kernels: no GPU needed)."""
    for name, args in (
        ("_flash_attention_forward", compat._FLASH_FORWARD_ARGS),
        ("_flash_attention_backward", compat._FLASH_BACKWARD_ARGS),
    ):
        schema = getattr(torch.ops.aten, name).default._schema
        assert set(args) == {a.name for a in schema.arguments} - {
            "window_size_left", "window_size_right", "seqused_k", "alibi_slopes"
        }  # fmt: skip
    n_q, n_k, heads, groups, dim = 10, 8, 4, 2, 64
    q = torch.empty(n_q, heads, dim, device="meta", dtype=torch.bfloat16)
    k = torch.empty(n_k, groups, dim, device="meta", dtype=torch.bfloat16)
    cu_q = torch.empty(3, device="meta", dtype=torch.int32)
    cu_k = torch.empty(3, device="meta", dtype=torch.int32)
    out, lse = compat.flash_attention_varlen_forward(q, k, k, cu_q, cu_k, 5, 4, 0.125)
    assert out.shape == (n_q, heads, dim) and lse.shape == (n_q, heads) and lse.dtype == torch.float32
    dq, dk, dv = compat.flash_attention_varlen_backward(out, q, k, k, out, lse, cu_q, cu_k, 5, 4, 0.125)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == k.shape


def test_a_changed_op_schema_is_reported():
    with pytest.raises(UnsupportedVersionError, match="no_such_argument"):
        compat._aten_op.__wrapped__("_flash_attention_forward", ("query", "no_such_argument"))
    with pytest.raises(UnsupportedVersionError, match="missing"):
        compat._aten_op.__wrapped__("_no_such_flash_op", ("query",))


def test_create_block_mask_keeps_block_size_and_default():
    def causal(b, h, q, kv):
        return q >= kv

    default = compat.create_block_mask(causal, 1, 256, 256, "cpu")
    assert default.BLOCK_SIZE == (128, 128)
    small = compat.create_block_mask(causal, 2, 256, 256, "cpu", block_size=64, compile=False)
    assert small.BLOCK_SIZE == (64, 64)
    dense = small.to_dense()
    assert dense.shape == (2, 1, 4, 4)
    assert torch.equal(dense[0, 0].bool(), torch.ones(4, 4, dtype=torch.bool).tril())


def test_read_items_for_chunks_cover_a_region_across_stored_chunks():
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        TensorProperties,
        TensorStorageMetadata,
    )

    stored = TensorStorageMetadata(
        properties=TensorProperties(dtype=torch.float32),
        size=torch.Size([4, 6]),
        chunks=[
            ChunkStorageMetadata(offsets=torch.Size([0, 0]), sizes=torch.Size([2, 6])),
            ChunkStorageMetadata(offsets=torch.Size([2, 0]), sizes=torch.Size([2, 6])),
        ],
    )
    region = ChunkStorageMetadata(offsets=torch.Size([1, 2]), sizes=torch.Size([2, 3]))
    items = compat.read_items_for_chunks("w", stored, [region])
    assert len(items) == 2
    assert sorted(tuple(i.storage_index.offset) for i in items) == [(0, 0), (2, 0)]
    assert all(tuple(i.lengths) == (1, 3) for i in items)


# --- megatron-core wrappers --------------------------------------------------------------------------


def test_gpt_dataset_window_refuses_an_object_without_the_helpers():
    class NotAGPTDataset:
        _pad_token_id = -1

    with pytest.raises(UnsupportedVersionError, match="_query_document_sample_shuffle_indices") as err:
        compat.gpt_dataset_window(NotAGPTDataset(), 0)
    assert f"megatron-core {compat.SUPPORTED_MEGATRON_CORE}.x" in str(err.value)
    with pytest.raises(UnsupportedVersionError, match="_pad_token_id"):
        compat.gpt_dataset_window(object(), 0)


def test_gpt_dataset_window_returns_tokens_and_pad_id():
    class FakeGPTDataset:
        _pad_token_id = -1

        def _query_document_sample_shuffle_indices(self, idx):
            return np.array([idx, 5, -1], dtype=np.int32), np.array([0]), [2]

    tokens, pad = compat.gpt_dataset_window(FakeGPTDataset(), 3)
    assert tokens.dtype == np.int64 and tokens.tolist() == [3, 5, -1] and pad == -1


def test_escape_percent_in_help_makes_help_printable():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratio", help="fraction in % of the total")
    parser.add_argument("--fine", help="100%% escaped already")
    with pytest.raises((TypeError, ValueError)):
        parser.format_help()
    compat.escape_percent_in_help(parser)
    text = parser.format_help()
    assert "fraction in % of the total" in text and "100% escaped already" in text


def test_use_shipped_dataset_helpers_replaces_the_rebuild(monkeypatch):
    import megatron.core.datasets.utils as dataset_utils

    monkeypatch.setattr(dataset_utils, "compile_helpers", dataset_utils.compile_helpers)  # restored after
    compat.use_shipped_dataset_helpers()
    assert dataset_utils.compile_helpers is compat._check_shipped_dataset_helpers
    dataset_utils.compile_helpers()  # the wheel's compiled helpers import: no make, no exit


# --- warnings ----------------------------------------------------------------------------------------


def test_pytest_ignores_exactly_the_known_warnings():
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as f:
        filters = tomllib.load(f)["tool"]["pytest"]["ini_options"]["filterwarnings"]
    ignored = [f for f in filters if f.startswith("ignore")]
    known = [f"ignore:{m}:{c.__name__}:{mod}" for m, c, mod in compat.KNOWN_WARNINGS]
    assert sorted(ignored) == sorted(known)
    assert all(f.count(":") == 3 for f in ignored)  # no category, message or module ignored wholesale
    assert "error::DeprecationWarning:megatron_sdar" in filters


def test_ignore_known_warnings_names_what_it_ignores():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compat.ignore_known_warnings()
        warnings.warn_explicit(
            "Transformer Engine and Apex are not installed. Falling back", UserWarning, "x.py", 1,
            module="megatron.core.optimizer",
        )  # fmt: skip
        warnings.warn_explicit(
            "Apex is not installed, really", UserWarning, "x.py", 1, module="megatron_sdar.x"
        )
        warnings.warn_explicit("something else", UserWarning, "x.py", 1, module="megatron.core.optimizer")
    assert [str(w.message) for w in caught] == ["Apex is not installed, really", "something else"]


def test_known_log_records_are_dropped_and_others_kept(caplog):
    """The named megatron-core / torch notices are dropped at their loggers; other records of the
    same loggers still reach the handlers."""
    import logging

    compat.ignore_known_warnings()
    compat.ignore_known_warnings()  # idempotent: one filter per logger
    for name, _ in compat.KNOWN_LOG_RECORDS:
        logger = logging.getLogger(name)
        assert sum(isinstance(f, compat.KnownRecordFilter) for f in logger.filters) == 1
    caplog.set_level(logging.INFO)
    gpt = logging.getLogger("megatron.core.models.gpt.gpt_model")
    gpt.warning("GPTModel IS DEPRECATED. GPTModel is only accepting critical bug fixes")
    gpt.warning("something else went wrong")
    logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found, using CUDA_HOME='/x'")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["something else went wrong"]
