"""The image build, checked without Docker: the build context leaves out what a checkout
accumulates (``.dockerignore``), and no pip install in the Dockerfile can replace the base image's
torch."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip().lstrip("/") for line in lines if line.strip() and not line.startswith("#")]


def _regex(pattern: str) -> re.Pattern:
    """Docker's matching (Go's filepath.Match on the path from the context root, ``**`` for any
    number of folders), enough for the patterns used here."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def excluded(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves ``path`` out of the context: a pattern matches it or a folder above it
    (the last matching pattern decides, ``!`` re-includes)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _regex(pattern[1:] if negate else pattern)
        if any(regex.match(p) for p in prefixes):
            result = not negate
    return result


def test_build_context_leaves_out_local_state():
    patterns = dockerignore_patterns()
    for path in [".git/HEAD", ".venv/bin/python", ".ci-venv/lib/x.py", "runs/qwen3/iter_0000010/a.distcp",
                 ".whl/torch-2.11.0-cp312-cp312-linux_x86_64.whl", "torch-2.11.0.whl", ".smol/model.gguf",
                 "megatron_sdar/__pycache__/config.cpython-312.pyc", "megatron_sdar.egg-info/PKG-INFO",
                 ".pytest_cache/v/cache/lastfailed", ".ruff_cache/0.1/x", "tests/__pycache__/a.pyc",
                 "ckpt/qwen3-8b/latest_checkpointed_iteration.txt"]:  # fmt: skip
        assert excluded(path, patterns), path


def test_build_context_keeps_every_source_the_image_installs():
    if not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout (its tracked files)")
    patterns = dockerignore_patterns()
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    files = tracked.stdout.split()
    needed = [f for f in files if not f.startswith((".ci/", ".gitignore"))]
    assert "setup.py" in needed and "README.md" in needed  # setup.py reads README.md
    assert any(f.startswith("megatron_sdar/data/") for f in needed)  # only the top-level data/ is left out
    dropped = [f for f in needed if excluded(f, patterns)]
    assert not dropped, dropped


def _run_commands(dockerfile: str) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined."""
    return [line.strip() for line in re.sub(r"\\\n", " ", dockerfile).splitlines() if line.strip()]


def test_no_pip_install_can_replace_the_image_torch():
    """The NGC image's torch (2.11.0a0+...) does not satisfy this package's torch==2.11.0: every pip
    install either skips dependency resolution or runs under a constraints file that pins the
    image's torch, and the build checks at the end that it is still the image's."""
    instructions = _run_commands((ROOT / "Dockerfile").read_text())
    pinned = False
    installs = 0
    for instruction in instructions:
        if instruction.startswith("ENV PIP_CONSTRAINT="):
            target = instruction.split("=", 1)[1]
            writers = [i for i in instructions if i.startswith("RUN") and f"> {target}" in i]
            assert writers and "'torch==' + version('torch')" in writers[0]
            pinned = True
        if not instruction.startswith("RUN"):
            continue
        for command in re.split(r"&&|;", instruction):
            if "pip install" in command:
                installs += 1
                assert "--no-deps" in command or pinned, command
                if re.search(r"\s(-e\s+)?\.(\s|$)", command):  # this package: torch==2.11.0
                    assert "--no-deps" in command, command
    assert installs >= 4 and pinned
    assert any("the image torch was replaced" in i for i in instructions)
