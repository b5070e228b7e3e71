"""The package's shape (issue 25): no import cycle between modules, no module importing another's
private names, no module over 500 lines. Read from the source with ``ast``, nothing imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "baq"
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(name: str) -> list[tuple[str, str | None]]:
    """``(module imported, name taken from it or None)`` for every import of a module, at its top
    or inside a function (an import run later closes a cycle all the same), except those under
    ``if TYPE_CHECKING``, which never run."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    parents = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.append((sub, None) if sub in MODULES else (mod, a.name))
    return [(m, n) for m, n in out if m == "baq" or m.startswith("baq.")]


def graph() -> dict[str, set[str]]:
    """Module -> the baq modules it imports (``baq`` itself, the public facade, left out: it
    imports lazily from everywhere and nothing inside the package should need it)."""
    return {
        name: {m for m, _ in imports_of(name) if m in MODULES and m not in ("baq", name)}
        for name in MODULES
    }


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_modules():
    assert find_cycle(graph()) is None


def test_no_module_imports_a_private_name_of_another():
    bad = [
        f"{name} imports {mod}.{what}"
        for name in MODULES
        for mod, what in imports_of(name)
        if what is not None and what.startswith("_") and what != "__version__" and mod != name
    ]
    assert not bad


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_over_500_lines(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name}: {lines} lines, split it by job"


def test_every_folder_is_a_package_and_quant_imports_only_torch():
    for folder in {p.parent for p in PACKAGE.rglob("*.py")}:
        assert (folder / "__init__.py").is_file(), folder
    for name in (n for n in MODULES if n.startswith("baq.quant")):
        others = {m for m, _ in imports_of(name) if not m.startswith("baq.quant")}
        # the math reads its settings (baq.config) and nothing of models, files or runs
        assert others <= {"baq.config"}, (name, others)
