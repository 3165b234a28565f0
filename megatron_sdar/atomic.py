"""Write a folder or a small file under a temporary name and rename it into place (pure python).

A reader never sees a half-written result: :func:`atomic_directory` hands out a temporary sibling of
the target that replaces it only when the ``with`` body succeeds, and is removed (the exception
re-raised) when it fails or is interrupted; :func:`atomic_write_text` does the same for one file.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager


def refuse_to_replace(final: str | os.PathLike, overwrite: bool) -> None:
    """Raise :class:`FileExistsError` where *final* is a non-empty folder and *overwrite* is off.

    An empty folder (or none) is always replaceable. Callers check before their expensive work, so
    that a refusal comes first; :func:`atomic_directory` checks again on entry.
    """
    if os.path.exists(final) and os.listdir(final) and not overwrite:
        raise FileExistsError(f"{final} is not empty; pass --overwrite to replace it")


@contextmanager
def atomic_directory(final: str | os.PathLike, overwrite: bool = False) -> Iterator[str]:
    """Yield a fresh temporary folder next to *final* (``<final>.tmp<pid>``) to write into.

    On success the old *final* (if any) is removed and the temporary folder renamed to *final*; on
    any exception, ``KeyboardInterrupt`` included, the temporary folder is removed and the exception
    re-raised, leaving *final* as it was. Without *overwrite* a non-empty *final* is refused before
    anything is written (:func:`refuse_to_replace`).
    """
    final = os.fspath(final)
    refuse_to_replace(final, overwrite)
    tmp = final.rstrip("/") + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
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
