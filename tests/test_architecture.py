"""Issue 15: the layering holds (no import cycle, function-local imports included; dependencies
point one way, checked with import-linter's contracts in pyproject.toml), no function is longer
than one screen, ruff is clean, and docs/architecture.md's worked examples run."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "lorakit"
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def lorakit_imports() -> dict[str, list[tuple[str, int, bool]]]:
    """module -> [(imported lorakit module, line, inside a function)] for every module of src/lorakit."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, list[tuple[str, int, bool]]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        edges = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(name, path.name == "__init__.py", node)
                targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names]
            else:
                continue
            for t in targets:
                if t == "lorakit" or t.startswith("lorakit."):
                    while t not in modules:
                        t = t.rsplit(".", 1)[0]
                    edges.append((t, node.lineno, id(node) in local))
        graph[name] = edges
    return graph


def test_no_import_cycles_function_local_imports_included():
    graph = {m: sorted({t for t, _, _ in edges if t != m}) for m, edges in lorakit_imports().items()}
    # a package's __init__ re-exporting its submodules is not a cycle of the layering
    graph = {m: [t for t in ts if not (m.startswith(t + ".") and t in graph)] for m, ts in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in graph.get(m, []):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles[:10])


def test_no_function_local_imports_of_lorakit_modules():
    """Local imports dodge cycles; only third-party imports may be deferred (optional, heavy)."""
    found = [f"{m}:{line} imports {t}" for m, edges in lorakit_imports().items() for t, line, local in edges if local]
    assert not found, "\n".join(found)


def test_the_package_does_not_import_its_own_facade():
    """`import lorakit` inside the package would make every module depend on everything."""
    found = [f"{m}:{line}" for m, edges in lorakit_imports().items() for t, line, _ in edges if t == "lorakit" and m != "lorakit"]
    assert not found, found


def test_no_function_over_one_screen():
    long = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not long, "\n".join(long)


def _tool(name: str) -> str:
    exe = Path(sys.executable).parent / name
    if not exe.exists():
        found = shutil.which(name)
        if found is None:
            pytest.fail(f"{name} is not installed (it is in the dev extra: pip install -e '.[dev]')")
        return found
    return str(exe)


def test_import_linter_contracts_hold():
    proc = subprocess.run([_tool("lint-imports"), str(ROOT / "pyproject.toml")], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert re.search(r"Contracts: \d+ kept, 0 broken", proc.stdout), proc.stdout[-2000:]


def test_ruff_is_clean_on_src():
    proc = subprocess.run([_tool("ruff"), "check", "src"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


ARCHITECTURE = ROOT / "docs" / "architecture.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", ARCHITECTURE.read_text(), flags=re.S)


def test_architecture_page_has_the_two_worked_examples():
    assert len(EXAMPLES) == 2


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_architecture_worked_example_runs(index, tmp_path):
    """Each example registers a kind or a variant (process-wide), so it runs in its own process."""
    script = tmp_path / "example.py"
    script.write_text(EXAMPLES[index])
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_every_module_is_on_the_architecture_page():
    """The module map names every module of the core (the job packages are listed as a whole)."""
    text = ARCHITECTURE.read_text()
    missing = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).with_suffix("")
        if rel.parts[0] in ("analysis", "train", "experiments", "quant", "export", "verify") or len(rel.parts) == 1 and rel.name in (
                "__init__", "__main__"):
            continue
        if rel.name == "__init__" and ast.get_docstring(ast.parse(path.read_text())) and len(ast.parse(path.read_text()).body) == 1:
            continue  # a package docstring and nothing else
        names = {f"`{'/'.join(rel.parts)}`", f"`{rel.name}`", f", `{rel.name}`"}
        if not any(n in text for n in names):
            missing.append("/".join(rel.parts))
    assert not missing, missing
