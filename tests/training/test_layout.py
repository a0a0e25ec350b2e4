"""The layout of training/ (#34), read from the source: a package per command's own parts, one
(`shared/`) for what several use, and imports that point one way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "training"
JOBS = ("pretraining", "evaluation", "finetuning", "embedding")
ENTRIES = ("training.pretrain", "training.evaluate", "training.finetune")
MAX_TOP_LEVEL_MODULES = 6


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """The training modules `path` imports, at any depth of its code (lazy imports count too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from .pkg import module`
    return {m for m in found if m == "training" or m.startswith("training.")}


def modules() -> dict[str, set[str]]:
    """Every module of training/ and the training modules it imports (names that are modules)."""
    paths = {module_name(p): p for p in ROOT.rglob("*.py")}
    return {name: {m for m in imported_modules(path) if m in paths} for name, path in paths.items()}


def job_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in JOBS else None


def subpackage_of(module: str) -> str | None:
    """`shared` for training.shared and training.shared.data; None for training and its top-level modules."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (ROOT / parts[1]).is_dir()) else None


def test_the_top_level_holds_at_most_six_modules():
    top = sorted(path.name for path in ROOT.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top
    assert {"__init__.py", "pretrain.py", "evaluate.py", "finetune.py"} <= set(top)


def test_every_subpackage_says_what_it_holds_and_exports_it():
    for package in sorted(p.parent for p in ROOT.glob("*/__init__.py")):
        tree = ast.parse((package / "__init__.py").read_text())
        assert ast.get_docstring(tree), package
        exported = [n for n in tree.body if isinstance(n, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets)]
        assert exported, f"{package.name}/__init__.py has no __all__"


def test_shared_imports_no_command():
    for module, imports in modules().items():
        if module.startswith("training.shared"):
            wrong = {m for m in imports if job_of(m) or m in ENTRIES}
            assert not wrong, f"{module} imports {sorted(wrong)}"


def test_a_command_uses_another_commands_public_names_only():
    for module, imports in modules().items():
        job = job_of(module)
        if job is None:
            continue
        private = {m for m in imports if job_of(m) not in (None, job) and m != f"training.{job_of(m)}"}
        assert not private, f"{module} imports {sorted(private)}: import from the package instead"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_cycle_between_modules():
    graph = {m: {i for i in imports if i != m and not m.startswith(i + ".")} for m, imports in modules().items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_no_cycle_between_subpackages():
    """Package level, between training's sub-packages. `training/__init__.py`, `arguments.py` and
    the entry modules sit above them and are left out here (the module-level test covers them)."""
    graph: dict[str, set[str]] = {}
    for module, imports in modules().items():
        source = subpackage_of(module)
        if source is None:
            continue
        graph.setdefault(source, set()).update(
            target for m in imports if (target := subpackage_of(m)) is not None and target != source
        )
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


@pytest.mark.parametrize("graph, cyclic", [({"a": {"b"}, "b": {"a"}}, True), ({"a": {"b"}, "b": set()}, False)])
def test_the_cycle_check_finds_cycles(graph, cyclic):
    assert (_cycle(graph) is not None) == cyclic
