"""The package's layers: each imports only the ones below it, with no import circle, and no file grows past
about 500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "helion_fusions"
# lower numbers are lower layers; folders of one layer do not import each other
LAYERS = {"runtime": 0, "quant": 0, "kernels": 1, "ops": 2, "api": 3, "tools": 4}
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    relative = Path(*name.split("."))
    return (REPO_ROOT / relative).with_suffix(".py").is_file() or (REPO_ROOT / relative / "__init__.py").is_file()


def _imports(path: Path) -> set[str]:
    """The package's modules ``path`` imports, anywhere in the file (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("helion_fusions")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("helion_fusions"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if _is_module(candidate) else node.module)
    return found


def _layer(module: str) -> str:
    """The folder under the package; the package itself and ``functional`` are the public API."""
    parts = module.split(".")
    return "api" if len(parts) == 1 or parts[1] == "functional" else parts[1]


def _graph() -> dict[str, set[str]]:
    return {_module_name(path): _imports(path) - {_module_name(path)} for path in sorted(PACKAGE.rglob("*.py"))}


def test_nothing_imports_upward_or_across() -> None:
    wrong = []
    for module, imported in _graph().items():
        for target in imported:
            mine, theirs = _layer(module), _layer(target)
            if LAYERS[theirs] > LAYERS[mine] or (LAYERS[theirs] == LAYERS[mine] and theirs != mine):
                wrong.append(f"{module} -> {target}")
    assert not wrong, f"imports against the layers {LAYERS}: {wrong}"


def test_no_import_circle() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                raise AssertionError(f"import circle: {' -> '.join(path[path.index(target):] + [target])}")
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_runtime_knows_no_op_by_name() -> None:
    from helion_fusions.runtime.registry import REGISTRY

    for path in (PACKAGE / "runtime").glob("*.py"):
        text = path.read_text()
        named = [name for name in REGISTRY if f'"{name}"' in text or f"'{name}'" in text]
        assert not named, f"{path.name} names ops {named}"


def test_files_stay_small() -> None:
    long = {str(p.relative_to(REPO_ROOT)): n for p in [*PACKAGE.rglob("*.py"), *(REPO_ROOT / "perf").glob("*.py")]
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_readme_stays_short() -> None:
    size = len((REPO_ROOT / "README.md").read_bytes())
    assert size <= 20_000, f"README.md is {size} bytes; keep it under 20 KB (full tables live in perf/results/)"
