"""The package's shape: pure pieces load no Megatron, no import cycles, no module-level mutable state."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "megatron_sdar"
PURE = (
    "config",
    "masks",
    "noise",
    "positions",
    "batch",
    "loss",
    "compiled",
    "compat",
    "evaluation",
    "schedule",
)


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def module_level_imports(path: Path, name: str) -> set[str]:
    """Package modules imported at module level (not inside functions), resolved to module names."""
    known = modules()
    found = set()
    for node in ast.parse(path.read_text()).body:
        targets = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("megatron_sdar"):
            targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.startswith("megatron_sdar")]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_pure_modules_load_no_megatron():
    code = (
        "import sys\n"
        + "".join(f"import megatron_sdar.{m}\n" for m in PURE)
        + "bad = sorted(m for m in sys.modules if m == 'megatron' or m.startswith('megatron.'))\n"
        + "assert not bad, bad[:10]\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_no_import_cycles():
    graph = {name: module_level_imports(path, name) for name, path in modules().items()}
    # a package imports its parents implicitly; only explicit edges can form cycles
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail, node, nxt]))
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_cycle_detection_finds_a_cycle(tmp_path, monkeypatch):
    """The cycle check above can fail: two modules importing each other are reported."""
    pkg = tmp_path / "megatron_sdar"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from megatron_sdar.b import y\nx = 1\n")
    (pkg / "b.py").write_text("from megatron_sdar.a import x\ny = 1\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    try:
        test_no_import_cycles()
    except AssertionError as err:
        assert "megatron_sdar.a -> megatron_sdar.b -> megatron_sdar.a" in str(err)
    else:
        raise AssertionError("the cycle was not found")


MUTABLE_CALLS = {"dict", "list", "set", "OrderedDict", "WeakSet", "WeakKeyDictionary", "WeakValueDictionary",
                 "defaultdict", "deque"}  # fmt: skip


def mutable_module_state(path: Path) -> list[str]:
    """Module-level names bound to empty containers or to instances of the package's own classes
    (caches, meters): state that belongs to an owner object instead."""
    tree = ast.parse(path.read_text())
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    found = []
    for node in tree.body:
        if not isinstance(node, ast.Assign | ast.AnnAssign) or node.value is None:
            continue
        value = node.value
        empty = isinstance(value, ast.Dict | ast.List | ast.Set) and not (
            value.keys if isinstance(value, ast.Dict) else value.elts
        )
        call = isinstance(value, ast.Call) and (
            getattr(value.func, "id", None) in MUTABLE_CALLS | classes
            or getattr(value.func, "attr", None) in MUTABLE_CALLS
        )
        if empty or call:
            found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    return found


def test_no_module_level_mutable_state():
    found = [hit for path in modules().values() for hit in mutable_module_state(path)]
    assert not found, found


def test_mutable_state_check_can_fail(tmp_path):
    (tmp_path / "m.py").write_text("class Cache:\n    pass\n\n\nCACHE = Cache()\n_LAST = {}\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path
    try:
        assert mutable_module_state(tmp_path / "m.py") == [
            f"{tmp_path.name}/m.py:5",
            f"{tmp_path.name}/m.py:6",
        ]
    finally:
        PACKAGE = saved
