"""What the data tools share: input reading, dropped-line reports, leftovers of killed runs, progress."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from megatron_sdar.data.inputs import JSON_ARRAY, TextLines, json_lines, utf8_error
from megatron_sdar.data.preprocessing import DroppedLines, clear_leftovers
from megatron_sdar.data.progress import Progress
from megatron_sdar.data.sft import ExampleSpill


def test_text_lines_number_lines_as_text_mode_does_and_name_bad_bytes(tmp_path):
    src = tmp_path / "in.txt"
    src.write_bytes(b"\xef\xbb\xbfone\r\ntwo \xff\xfe\nthr\xc3\xa9e\rfour\n\xe2\x82")
    lines = TextLines(str(src))
    assert lines.position == 0
    got = list(lines)
    with open(src, encoding="utf-8", errors="replace") as f:
        assert [n for n, _, _ in got] == list(range(1, len(f.readlines()) + 1))
    assert [(text, error) for _, text, error in got] == [
        ("one\n", None),  # byte-order mark dropped, CRLF read as a newline
        ("two \udcff\udcfe\n", "not UTF-8 (byte 0xff at column 5)"),
        ("thr\u00e9e\n", None),  # a lone CR ends a line too
        ("four\n", None),
        ("\udce2\udc82", "not UTF-8 (byte 0xe2 at column 1)"),  # cut inside a character
    ]
    assert lines.position == src.stat().st_size
    assert utf8_error("a\nb\ud800", unit="character") == "unpaired surrogate (\\ud800 at character 2)"
    assert utf8_error("caf\u00e9") is None


def test_json_lines_skip_blank_lines_and_refuse_json_arrays(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"a": 1}\n\n  \n{"a": \n[1, 2]\n"\xff"\n')
    assert list(json_lines(TextLines(str(src)))) == [
        (1, {"a": 1}, None),
        (4, None, "invalid JSON (Expecting value at column 7)"),
        (5, [1, 2], None),  # not an object: the caller says so
        (6, None, "not UTF-8 (byte 0xff at column 2)"),
    ]
    for text in ('\n[\n  {"text": "a"},\n  {"text": "b"}\n]\n', '[{"text": "a"}, {"text": "b"}]\n'):
        src.write_text(text)
        first = 2 if text.startswith("\n") else 1
        assert list(json_lines(TextLines(str(src)))) == [(first, None, JSON_ARRAY)]


def test_dropped_lines_count_reasons_with_their_most_common_details():
    dropped = DroppedLines(strict=False, keep=2)
    for line in range(1, 5):
        dropped.add("a.jsonl", line, "missing key 'text' (keys seen: 'content')")
    dropped.add("a.jsonl", 5, "invalid JSON (Expecting value at column 1)")
    dropped.add("a.jsonl", 6, "invalid JSON (Extra data at column 9)")
    dropped.add("a.jsonl", 7, "expected a JSON object, got list")
    assert dropped.total == 7
    assert dropped.summary() == [
        "4 lines: missing key 'text' (keys seen: 'content')",
        "2 lines: invalid JSON (Expecting value at column 1: 1; Extra data at column 9: 1)",
        "1 line: expected a JSON object, got list",
    ]
    assert dropped.examples == [
        "a.jsonl:1: missing key 'text' (keys seen: 'content')",
        "a.jsonl:2: missing key 'text' (keys seen: 'content')",
    ]
    assert "first of them:\n  a.jsonl:1: missing key" in dropped.explain()
    with pytest.raises(SystemExit, match=r"^error: b.txt:3: not UTF-8 \(byte 0xff\) \(drop --strict"):
        DroppedLines(strict=True).add("b.txt", 3, "not UTF-8 (byte 0xff)")


def finished_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(proc.stdout)


def test_clear_leftovers_removes_files_of_ended_processes_only(tmp_path):
    prefix = str(tmp_path / "out_text_document")
    dead = finished_pid()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        files = {
            "dead": [f"{prefix}.tmp{dead}.bin", f"{prefix}.tmp{dead}.idx"],
            "alive": [f"{prefix}.tmp{alive.pid}.bin"],
            "other": [prefix + ".tmpx.bin", prefix + "_more.tmp1.bin", prefix + ".tmp1.txt"],
        }
        for path in sum(files.values(), []):
            open(path, "w").close()
        notes = clear_leftovers([prefix])
        assert (
            notes
            == [
                f"note: removed {', '.join(files['dead'])}: left by an interrupted run "
                f"(process {dead} is no longer running)",
                f"note: left alone {files['alive'][0]}: temporary files of process {alive.pid}, which is "
                "still running (another run writing the same output?)",
            ][:: 1 if dead < alive.pid else -1]
        )
        assert sorted(os.listdir(tmp_path)) == sorted(
            os.path.basename(p) for p in files["alive"] + files["other"]
        )
        # written long before the process with that id started: the id was reused, so it is stale
        old = time.time() - 3600
        os.utime(files["alive"][0], (old, old))
        assert "the id now belongs to a process started after" in clear_leftovers([prefix])[0]
        assert not os.path.exists(files["alive"][0])
    finally:
        alive.kill()
        alive.wait()


def test_clear_leftovers_leaves_other_hosts_files_alone(tmp_path):
    """Temporary files record their writer's host: on a shared file system a run on another node may
    still be writing, which cannot be checked from here, so only this host's dead writers' files go."""
    from megatron_sdar.atomic import host_name

    prefix = str(tmp_path / "out_text_document")
    dead = finished_pid()
    mine = [f"{prefix}.tmp-{host_name()}-{dead}.bin", f"{prefix}.tmp-{host_name()}-{dead}.idx"]
    theirs = f"{prefix}.tmp-node-17.cluster-{dead}.bin"  # a host name with dashes and dots
    for path in [*mine, theirs]:
        open(path, "w").close()
    notes = clear_leftovers([prefix])
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(theirs)]
    assert any(n.startswith(f"note: removed {', '.join(mine)}") for n in notes)
    assert any(
        f"left alone {theirs}: temporary files of process {dead} on host node-17.cluster" in n for n in notes
    )


def test_outputs_are_written_under_host_and_process_names(tmp_path):
    from megatron_sdar.atomic import host_name
    from megatron_sdar.data.preprocessing import IndexedOutputs

    prefix = str(tmp_path / "out")
    with IndexedOutputs({"text": prefix}, {"text": np.int32}) as outputs:
        outputs.add_document("text", [1, 2, 3])
        assert os.path.basename(outputs.tmp["text"]) == f"out.tmp-{host_name()}-{os.getpid()}"
        assert os.path.exists(outputs.tmp["text"] + ".bin")
    assert sorted(os.listdir(tmp_path)) == ["out.bin", "out.idx"]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_reports_rate_and_eta_at_most_every_interval():
    clock, out = Clock(), io.StringIO()
    progress = Progress("documents", total_bytes=4_000_000, interval=2.0, stream=out, clock=clock)
    clock.now += 1.0
    progress.update(50, 500_000)
    assert out.getvalue() == ""  # not due yet
    clock.now += 1.5
    progress.update(100, 1_000_000)
    clock.now += 0.5
    progress.update(120, 1_200_000)  # 0.5 s after the last report: not printed
    clock.now += 2.5
    progress.finish(200, 4_000_000)
    assert out.getvalue().splitlines() == [
        "100 documents, 40 documents/s, 1.0 MB of 4.0 MB (25%) read, 400.0 kB/s, ETA 8s",
        "200 documents, 36 documents/s, 4.0 MB of 4.0 MB (100%) read, 727.3 kB/s, done in 6s",
    ]
    windows = Progress("windows", total=50, every=10, stream=(out := io.StringIO()), clock=clock)
    windows.update(0)
    for n in range(1, 21):
        clock.now += 1.0
        windows.update(n)
        windows.update(n)  # a line dropped: the count stays, and is not reported twice
    assert out.getvalue().splitlines() == [
        "10 windows of 50 (20%), 1 windows/s, ETA 40s",
        "20 windows of 50 (40%), 1 windows/s, ETA 30s",
    ]
    terminal = Terminal()
    rewritten = Progress("documents", every=1, stream=terminal, clock=clock)
    rewritten.update(1)
    rewritten.update(2)
    rewritten.finish(2)
    assert terminal.getvalue().startswith("\r1 documents, ") and terminal.getvalue().count("\r") == 3
    assert "\r2 documents, " in terminal.getvalue() and terminal.getvalue().endswith("done in 0s\n")
    quick = Progress("documents", stream=(out := io.StringIO()), clock=clock)
    quick.update(5)
    quick.finish(5)
    assert out.getvalue() == ""  # a run shorter than one interval prints nothing


def test_example_spill_reads_back_what_was_appended(tmp_path):
    spill = ExampleSpill(str(tmp_path / "spill"))
    rows = [([5, 70000, 3], [False, True, True]), ([9], [True]), (list(range(100)), [True] * 100)]
    for tokens, eligible in rows:
        spill.append(tokens, eligible)
    spill.finish()
    assert len(spill) == 3 and list(spill.lengths) == [3, 1, 100]
    for i in (2, 0, 1):
        tokens, eligible = spill[i]
        assert tokens.tolist() == rows[i][0] and eligible.astype(bool).tolist() == rows[i][1]
        assert tokens.dtype == np.int32
    spill.close()
