"""Reading the data tools' input files line by line, with every unusable line named by its number.

Files are read as UTF-8 with Python's universal newlines (so line numbers are those of the text
mode every editor shows). Bytes that are not UTF-8 do not stop the reading: the line that holds
them is returned with the reason (which byte, which column) and the caller reports and skips it.
A leading byte-order mark is dropped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

BOM = "\ufeff"
JSON_ARRAY = (
    "the file is a JSON array, not JSON lines (expected one JSON object per line; convert it "
    "first, e.g. with jq -c '.[]' IN.json > OUT.jsonl)"
)


def utf8_error(text: str, unit: str = "column") -> str | None:
    """Why ``text`` cannot be written as UTF-8 (``None`` when it can).

    Undecodable input bytes arrive here as lone surrogates (``surrogateescape``); JSON can also
    spell a lone surrogate as an escape (``"\\ud800"``). Tokenizers fail on both. The place is
    counted in characters from the start of ``text``'s last line (``unit`` names it).
    """
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        char = ord(text[err.start])
        where = f"{unit} {err.start - text.rfind('\n', 0, err.start)}"
        if 0xDC80 <= char <= 0xDCFF:
            return f"not UTF-8 (byte 0x{char - 0xDC00:02x} at {where})"
        return f"unpaired surrogate (\\u{char:04x} at {where})"
    return None


class TextLines:
    """The lines of one text file: ``(line number, text, reason or None)``, numbered from 1.

    ``position`` is how far into the file (in bytes) the reading has got, for progress reports; it
    runs ahead of the last line by at most one read buffer.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.size = os.path.getsize(path)
        self._file = None

    @property
    def position(self) -> int:
        if self._file is None or self._file.closed:
            return self.size if self._file is not None else 0
        return self._file.buffer.tell()

    def __iter__(self) -> Iterator[tuple[int, str, str | None]]:
        with open(self.path, encoding="utf-8", errors="surrogateescape") as f:
            self._file = f
            for lineno, line in enumerate(f, 1):
                if lineno == 1 and line.startswith(BOM):
                    line = line[1:]
                yield lineno, line, utf8_error(line)


def json_lines(lines: TextLines) -> Iterator[tuple[int, Any, str | None]]:
    """``(line number, parsed value, reason or None)`` for each non-blank line of a JSONL file.

    A file whose first non-blank line opens a JSON array is one reason at that line, and nothing
    more of it is read (a JSON array is never one usable line, and its pretty-printed lines are
    not JSON values of their own).
    """
    first = True
    for lineno, line, error in lines:
        if error is None and not line.strip():
            continue
        if first and error is None and line.lstrip().startswith("["):
            yield lineno, None, JSON_ARRAY
            return
        first = False
        if error is not None:
            yield lineno, None, error
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            column = min(err.pos, len(line.rstrip("\r\n"))) + 1  # the end of the line, not the next one
            yield lineno, None, f"invalid JSON ({err.msg} at column {column})"
            continue
        yield lineno, value, None
