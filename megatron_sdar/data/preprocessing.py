"""Shared by the data tools: safe indexed-dataset output and the report of unusable input lines.

Indexed datasets are written under temporary names (``{prefix}.tmp-{host}-{pid}.bin/.idx``) and
renamed together when complete, so an interrupted or failed run removes its temporary files and never
leaves a ``.bin``/``.idx`` pair that looks valid; existing outputs are only replaced when asked to.
A run that was killed outright cannot remove its temporary files; the next run for the same output
on the same host does (:func:`clear_leftovers`), unless the process that wrote them is still
running. Files of another host (a shared file system) are left alone: whether their writer still
runs cannot be checked from here.
"""

from __future__ import annotations

import glob
import os
import re
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np

EXTENSIONS = (".bin", ".idx")
# what a run writes next to an output prefix: the temporary dataset and scratch files (host and pid;
# earlier versions wrote ``.tmp{pid}``, which is read as this host's)
TEMPORARY = re.compile(r"\.tmp(?:-(?P<host>.+)-)?(?P<pid>\d+)\.(bin|idx|examples)")


def clear_leftovers(prefixes: Iterable[str]) -> list[str]:
    """Remove the temporary files of earlier runs, for these output prefixes, whose process is gone.

    Files of a process that is still running are left alone. Returns one note per process, saying
    what was removed or kept and why.
    """
    from megatron_sdar.atomic import host_name

    here = host_name()
    by_writer: dict[tuple[str, int], list[str]] = {}
    for prefix in prefixes:
        for path in sorted(glob.glob(glob.escape(prefix) + ".tmp*")):
            match = TEMPORARY.fullmatch(path[len(prefix) :])
            if match and os.path.isfile(path):
                by_writer.setdefault((match["host"] or here, int(match["pid"])), []).append(path)
    notes = []
    for (host, pid), paths in sorted(by_writer.items()):
        if host != here:
            notes.append(
                f"note: left alone {', '.join(paths)}: temporary files of process {pid} on host {host}, "
                "which cannot be checked from here (remove them if no run there writes this output)"
            )
            continue
        why_stale = _stale(pid, paths)
        if why_stale is None:
            notes.append(
                f"note: left alone {', '.join(paths)}: temporary files of process {pid}, which is "
                "still running (another run writing the same output?)"
            )
            continue
        for path in paths:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
        notes.append(f"note: removed {', '.join(paths)}: left by an interrupted run ({why_stale})")
    return notes


def _stale(pid: int, paths: list[str]) -> str | None:
    """Why process ``pid`` cannot be writing ``paths`` any more, or None if it may be."""
    import psutil

    if pid == os.getpid():  # this process is only starting to write: nothing of it is there yet
        return f"process {pid} is this one, which has not started writing"
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return f"process {pid} has ended"
        started = process.create_time()
    except psutil.NoSuchProcess:
        return f"process {pid} is no longer running"
    except psutil.Error:  # it exists but cannot be inspected: assume it is the writer
        return None
    newest = max((os.path.getmtime(p) for p in paths if os.path.exists(p)), default=started)
    if started > newest + 1.0:
        return f"process {pid} has ended; the id now belongs to a process started after they were written"
    return None


class IndexedOutputs:
    """Several indexed datasets (``{name: prefix}``) filled document by document.

    ``leftovers`` holds the notes of :func:`clear_leftovers`, run for these prefixes on creation.
    :meth:`scratch` names further temporary files, removed however the run ends.
    """

    def __init__(self, prefixes: dict[str, str], dtypes: dict[str, Any], overwrite: bool = False) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        for prefix in prefixes.values():
            for ext in EXTENSIONS:
                if os.path.exists(prefix + ext) and not overwrite:
                    raise FileExistsError(f"{prefix + ext} exists; pass --overwrite to replace it")
            os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self.leftovers = clear_leftovers(prefixes.values())
        self.prefixes = prefixes
        from megatron_sdar.atomic import host_name

        writer = f"{host_name()}-{os.getpid()}"
        self.tmp = {name: f"{prefix}.tmp-{writer}" for name, prefix in prefixes.items()}
        self.scratch_files: list[str] = []
        self.builders = {
            name: IndexedDatasetBuilder(self.tmp[name] + ".bin", dtype=dtypes[name]) for name in prefixes
        }

    def scratch(self, name: str, suffix: str = ".examples") -> str:
        """A temporary file beside output ``name`` for the run's own use; removed on exit."""
        path = self.tmp[name] + suffix
        self.scratch_files.append(path)
        return path

    def add_document(self, name: str, values: Any) -> None:
        array = np.asarray(values, dtype=np.int64)
        self.builders[name].add_document(array, [len(array)])

    def __enter__(self) -> IndexedOutputs:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._remove(self.scratch_files)
        if exc_type is None:
            try:
                for name, builder in self.builders.items():
                    builder.finalize(self.tmp[name] + ".idx")
            except BaseException:
                self._remove_temporary()
                raise
            for name, prefix in self.prefixes.items():
                for ext in EXTENSIONS:
                    os.replace(self.tmp[name] + ext, prefix + ext)
        else:
            self._remove_temporary()
        return False

    def _remove_temporary(self) -> None:
        for builder in self.builders.values():
            builder.data_file.close()
        self._remove(path + ext for path in self.tmp.values() for ext in EXTENSIONS)

    @staticmethod
    def _remove(paths: Iterable[str]) -> None:
        for path in paths:
            if os.path.exists(path):
                os.remove(path)


class DroppedLines:
    """Counts unusable input lines by reason and keeps the first few, with file and line number.

    A reason may end in a parenthesised detail (``missing key 'text' (keys seen: 'body')``): lines
    are counted by the part before it, and the most frequent details are kept for the summary.
    """

    def __init__(self, strict: bool, keep: int = 20, details: int = 3) -> None:
        self.strict = strict
        self.keep = keep
        self.details = details
        self.by_reason: Counter = Counter()
        self.details_by_reason: dict[str, Counter] = {}
        self.examples: list[str] = []

    def add(self, source: str, line: int, reason: str) -> None:
        """Record one line; with ``strict`` it is an error instead."""
        where = f"{source}:{line}: {reason}"
        if self.strict:
            raise SystemExit(f"error: {where} (drop --strict to skip such lines)")
        key, _, detail = reason.partition(" (")
        detail = detail.removesuffix(")")
        self.by_reason[key] += 1
        if detail:
            seen = self.details_by_reason.setdefault(key, Counter())
            if detail in seen or len(seen) < 100:  # bounded: details can differ on every line
                seen[detail] += 1
        if len(self.examples) < self.keep:
            self.examples.append(where)

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def summary(self) -> list[str]:
        """One line per reason, most frequent first: ``12 lines: missing key 'text' (keys seen: ...)``."""
        out = []
        for reason, count in self.by_reason.most_common():
            text = f"{count} line{'s' if count != 1 else ''}: {reason}"
            details = self.details_by_reason.get(reason)
            if details:
                shown = [
                    detail if len(details) == 1 else f"{detail}: {n}"
                    for detail, n in details.most_common(self.details)
                ]
                more = len(details) - len(shown)
                text += f" ({'; '.join(shown)}{f'; {more} more' if more > 0 else ''})"
            out.append(text)
        return out

    def explain(self) -> str:
        """The counted reasons and the first lines, for an error that nothing usable was left."""
        lines = [f"  {line}" for line in self.summary()]
        if self.examples:
            lines.append("first of them:")
            lines += [f"  {line}" for line in self.examples[:3]]
        return "\n".join(lines)

    def print(self) -> None:
        print(f"dropped lines: {self.total}")
        for line in self.summary():
            print(f"  {line}")
        for line in self.examples:
            print(f"  {line}")
        if self.total > len(self.examples):
            print(f"  ... and {self.total - len(self.examples)} more")
