"""Writes under a temporary name: renamed into place on success, nothing left behind on failure."""

from __future__ import annotations

import os

import pytest

from megatron_sdar.atomic import atomic_directory, atomic_write_text


def test_success_renames_into_place(tmp_path):
    final = tmp_path / "out"
    with atomic_directory(final) as tmp:
        assert not final.exists()
        assert [p.name for p in tmp_path.iterdir()] == [os.path.basename(tmp)]  # a sibling of final
        with open(f"{tmp}/a.txt", "w") as f:
            f.write("new")
    assert (final / "a.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_exception_leaves_nothing_and_is_re_raised(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(final) as tmp:
            with open(f"{tmp}/a.txt", "w") as f:
                f.write("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_target_is_refused_without_overwrite_and_replaced_with_it(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="not empty; pass --overwrite"):
        with atomic_directory(final):
            raise AssertionError("the body must not run")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (final / "old.txt").read_text() == "old"

    with pytest.raises(KeyboardInterrupt):  # a failed overwrite keeps the old folder
        with atomic_directory(final, overwrite=True):
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (final / "old.txt").exists()

    with atomic_directory(final, overwrite=True) as tmp:
        with open(f"{tmp}/new.txt", "w") as f:
            f.write("new")
    assert [p.name for p in final.iterdir()] == ["new.txt"]

    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_directory(empty) as tmp:  # an empty folder is replaced without --overwrite
        with open(f"{tmp}/x.txt", "w") as f:
            f.write("x")
    assert [p.name for p in empty.iterdir()] == ["x.txt"]


def test_atomic_write_text(tmp_path):
    path = tmp_path / "latest.txt"
    atomic_write_text(path, "iter_0000001")
    atomic_write_text(path, "iter_0000002")
    assert path.read_text() == "iter_0000002"
    assert [p.name for p in tmp_path.iterdir()] == ["latest.txt"]
    with pytest.raises(FileNotFoundError):
        atomic_write_text(tmp_path / "missing" / "latest.txt", "x")
    assert [p.name for p in tmp_path.iterdir()] == ["latest.txt"]
