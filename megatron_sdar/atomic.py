"""Write a folder or a small file under a temporary name and rename it into place (pure python).

A reader never sees a half-written result: :func:`atomic_directory` hands out a temporary sibling of
the target that replaces it only when the ``with`` body succeeds, and is removed (the exception
re-raised) when it fails or is interrupted; :func:`atomic_write_text` does the same for one file.

The temporary folder's name records the writer's host and process id
(``<target>.tmp-<host>-<pid>``). A process that is killed outright cannot remove it, so the next
write of the same target looks for such leftovers first: those of a process that no longer runs
are removed (and reported on stderr); one whose writer still runs, or runs on another host where
it cannot be checked, means a concurrent write, which is refused (:class:`TargetBusyError`).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


class TargetBusyError(FileExistsError):
    """Another process is writing the same target (its temporary folder is there)."""


@dataclass(frozen=True)
class Leftover:
    """A temporary folder of a write of some target: its path, and the host and process that made it."""

    path: str
    host: str
    pid: int

    def here(self) -> bool:
        return self.host == host_name()

    def running(self) -> bool:
        """Whether the writer may still run: on this host, its process exists (a zombie does not
        count); on another host it cannot be checked, so it may."""
        if not self.here():
            return True
        if self.pid == os.getpid():
            return False  # this process left it behind; no write of ours is in progress
        return _process_running(self.pid)


def host_name() -> str:
    """This host's name as temporary file names record it (letters, digits, ``_.-``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "localhost"


def _process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
        return state not in ("Z", "X")  # a zombie has finished; it only waits to be reaped
    except (OSError, IndexError):
        return True


def _split(final: str | os.PathLike) -> tuple[str, str]:
    parent, name = os.path.split(os.path.abspath(os.fspath(final)))
    return parent, name


def temporary_name(final: str | os.PathLike) -> str:
    """The temporary folder this process writes *final* under (a sibling of it)."""
    parent, name = _split(final)
    return os.path.join(parent, f"{name}.tmp-{host_name()}-{os.getpid()}")


def leftovers(final: str | os.PathLike) -> list[Leftover]:
    """Temporary folders of writes of *final* found next to it, this process's own included.

    Besides ``<name>.tmp-<host>-<pid>`` this recognises the names earlier versions used on this
    host, ``<name>.tmp<pid>`` and ``.<name>.tmp<pid>``.
    """
    parent, name = _split(final)
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    current = re.compile(rf"{re.escape(name)}\.tmp-(?P<host>.+)-(?P<pid>\d+)")
    older = re.compile(rf"\.?{re.escape(name)}\.tmp(?P<pid>\d+)")
    found = []
    for entry in sorted(entries):
        path = os.path.join(parent, entry)
        if not os.path.isdir(path) or os.path.islink(path):
            continue
        if m := current.fullmatch(entry):
            found.append(Leftover(path, m["host"], int(m["pid"])))
        elif m := older.fullmatch(entry):
            found.append(Leftover(path, host_name(), int(m["pid"])))
    return found


def _size_mb(path: str) -> float:
    total = 0
    for folder, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(folder, f)).st_size
            except OSError:
                pass
    return total / 2**20


def _refuse_busy(final: str, busy: list[Leftover]) -> None:
    if not busy:
        return
    left = busy[0]
    if left.here():
        who = f"process {left.pid} on this host"
    else:
        who = f"process {left.pid} on host {left.host}, which cannot be checked from here"
    raise TargetBusyError(
        f"{final} is being written by {who} (its temporary folder is {left.path}); wait for it to "
        f"finish, or, if it is no longer running, remove that folder"
    )


def refuse_to_replace(final: str | os.PathLike, overwrite: bool) -> None:
    """Raise :class:`FileExistsError` where *final* is a non-empty folder and *overwrite* is off,
    and :class:`TargetBusyError` (a ``FileExistsError``) where another process is writing it.

    An empty folder (or none) is always replaceable. Callers check before their expensive work, so
    that a refusal comes first; :func:`atomic_directory` checks again on entry.
    """
    final = os.fspath(final)
    _refuse_busy(final, [t for t in leftovers(final) if t.running()])
    if os.path.exists(final) and not os.path.isdir(final):
        raise FileExistsError(f"{final} is a file, not a folder")
    if os.path.exists(final) and os.listdir(final) and not overwrite:
        raise FileExistsError(f"{final} is not empty; pass --overwrite to replace it")


def remove_stale_temporaries(final: str | os.PathLike) -> list[str]:
    """Remove the temporary folders that writes of *final* by processes no longer running left
    behind, saying so on stderr; returns their paths. Those of running writers are kept."""
    removed = []
    for left in leftovers(final):
        if left.running():
            continue
        size = _size_mb(left.path)
        shutil.rmtree(left.path, ignore_errors=True)
        if left.pid != os.getpid():
            print(
                f"notice: removed {left.path} ({size:.0f} MB), left by an interrupted write of "
                f"{os.fspath(final)} (process {left.pid} is no longer running)",
                file=sys.stderr,
            )
        removed.append(left.path)
    return removed


@contextmanager
def atomic_directory(final: str | os.PathLike, overwrite: bool = False) -> Iterator[str]:
    """Yield a fresh temporary folder next to *final* (:func:`temporary_name`) to write into.

    On success the old *final* (if any) is removed and the temporary folder renamed to *final*; on
    any exception, ``KeyboardInterrupt`` included, the temporary folder is removed and the exception
    re-raised, leaving *final* as it was. Without *overwrite* a non-empty *final* is refused before
    anything is written (:func:`refuse_to_replace`), and so is a *final* another process is
    writing; what interrupted writes left behind is removed first
    (:func:`remove_stale_temporaries`).
    """
    final = os.fspath(final).rstrip("/") or "/"
    refuse_to_replace(final, overwrite)
    remove_stale_temporaries(final)
    tmp = temporary_name(final)
    os.makedirs(tmp)
    try:
        # two writers that started together both see the other's folder now, and both stop
        _refuse_busy(final, [t for t in leftovers(final) if t.path != tmp and t.running()])
        yield tmp
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write *text* to a hidden temporary file next to *path* and rename it over *path*."""
    folder, name = os.path.split(os.fspath(path))
    tmp = os.path.join(folder, f".{name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
