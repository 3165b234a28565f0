"""Shared by the data tools: safe indexed-dataset output and the report of unusable input lines.

Indexed datasets are written under temporary names and renamed together when complete, so an
interrupted or failed run removes its temporary files and never leaves a ``.bin``/``.idx`` pair that
looks valid; existing outputs are only replaced when asked to.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import numpy as np

EXTENSIONS = (".bin", ".idx")


class IndexedOutputs:
    """Several indexed datasets (``{name: prefix}``) filled document by document."""

    def __init__(self, prefixes: dict[str, str], dtypes: dict[str, Any], overwrite: bool = False) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        for prefix in prefixes.values():
            for ext in EXTENSIONS:
                if os.path.exists(prefix + ext) and not overwrite:
                    raise FileExistsError(f"{prefix + ext} exists; pass --overwrite to replace it")
            os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self.prefixes = prefixes
        self.tmp = {name: f"{prefix}.tmp{os.getpid()}" for name, prefix in prefixes.items()}
        self.builders = {
            name: IndexedDatasetBuilder(self.tmp[name] + ".bin", dtype=dtypes[name]) for name in prefixes
        }

    def add_document(self, name: str, values: Any) -> None:
        array = np.asarray(values, dtype=np.int64)
        self.builders[name].add_document(array, [len(array)])

    def __enter__(self) -> IndexedOutputs:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
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
        for path in self.tmp.values():
            for ext in EXTENSIONS:
                if os.path.exists(path + ext):
                    os.remove(path + ext)


class DroppedLines:
    """Counts unusable input lines by reason and keeps the first few, with file and line number."""

    def __init__(self, strict: bool, keep: int = 20) -> None:
        self.strict = strict
        self.keep = keep
        self.by_reason: Counter = Counter()
        self.examples: list[str] = []

    def add(self, source: str, line: int, reason: str) -> None:
        """Record one line; with ``strict`` it is an error instead."""
        where = f"{source}:{line}: {reason}"
        if self.strict:
            raise SystemExit(f"error: {where} (drop --strict to skip such lines)")
        self.by_reason[reason.split(" (")[0]] += 1
        if len(self.examples) < self.keep:
            self.examples.append(where)

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def print(self) -> None:
        print(f"dropped lines: {self.total}")
        for line in self.examples:
            print(f"  {line}")
        if self.total > len(self.examples):
            print(f"  ... and {self.total - len(self.examples)} more")
