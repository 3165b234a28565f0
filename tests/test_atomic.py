"""Writes under a temporary name: renamed into place on success, nothing left behind on failure;
what a killed writer left is removed by the next write, and a running writer's is respected."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time

import pytest

from megatron_sdar import atomic
from megatron_sdar.atomic import atomic_directory, atomic_write_text, refuse_to_replace


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

    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="file is a file, not a folder"):
        refuse_to_replace(tmp_path / "file", True)

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


def dead_pid() -> int:
    """The id of a process that has finished and been reaped."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def host() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())


def test_the_temporary_name_records_host_and_pid(tmp_path):
    assert os.path.basename(atomic.temporary_name(tmp_path / "out")) == f"out.tmp-{host()}-{os.getpid()}"


def test_leftovers_of_writers_that_died_are_removed_and_reported(tmp_path, capsys):
    final = tmp_path / "out"
    pid = dead_pid()
    old = [f"out.tmp-{host()}-{pid}", f".out.tmp{pid}", f"out.tmp{pid}"]  # this and earlier versions
    for name in old + [f"other.tmp-{host()}-{pid}"]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "shard").write_bytes(b"\0" * 2**20)
    assert sorted(os.path.basename(t.path) for t in atomic.leftovers(final)) == sorted(old)
    with atomic_directory(final) as tmp:
        with open(f"{tmp}/a.txt", "w") as f:
            f.write("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.tmp-" + host() + f"-{pid}", "out"]
    err = capsys.readouterr().err
    for name in old:
        assert f"notice: removed {tmp_path / name} (1 MB), left by an interrupted write of {final}" in err
    assert f"process {pid} is no longer running" in err


def test_a_running_writer_is_refused_and_its_folder_kept(tmp_path):
    final = tmp_path / "out"
    running = tmp_path / f"out.tmp-{host()}-{os.getppid()}"  # the parent runs while we do
    running.mkdir()
    said = f"{final} is being written by process {os.getppid()} on this host .* if it is no longer running"
    for attempt in (lambda: refuse_to_replace(final, True), lambda: atomic_directory(final).__enter__()):
        with pytest.raises(atomic.TargetBusyError, match=said):
            attempt()
    assert [p.name for p in tmp_path.iterdir()] == [running.name]
    running.rename(tmp_path / f"out.tmp-elsewhere-{os.getpid()}")  # another host cannot be checked
    with pytest.raises(FileExistsError, match="on host elsewhere, which cannot be checked from here"):
        refuse_to_replace(final, False)


def test_a_finished_but_unreaped_writer_counts_as_gone(tmp_path):
    proc = subprocess.Popen(["true"])
    try:
        for _ in range(500):  # wait until it has exited (a zombie: nobody has reaped it yet)
            with open(f"/proc/{proc.pid}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] == "Z":
                    break
            time.sleep(0.01)
        left = atomic.Leftover(str(tmp_path / f"out.tmp-{host()}-{proc.pid}"), host(), proc.pid)
        assert not left.running()
        assert atomic.Leftover("x", host(), os.getppid()).running()
    finally:
        proc.wait()
