"""The package's shape: no import cycles, a pure-MLX model, imports at the top of modules."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mlx_smolvlm"
# Optional dependencies, imported where they are used so that the package works without them.
OPTIONAL = {
    "threadpoolctl",
    "matplotlib",
    "av",
    "torch",
    "transformers",
    "readline",
    "docling_core",
    "pypdfium2",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(importer: str, node: ast.ImportFrom) -> str:
    """The absolute module name an ImportFrom node reads from."""
    if node.level == 0:
        return node.module or ""
    package = importer if MODULES[importer].name == "__init__.py" else importer.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def imports(name: str) -> list[tuple[str, ast.stmt]]:
    """(imported project module, node) for every import statement of module `name`."""
    found = []
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = resolve(name, node)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append((submodule if submodule in MODULES else base, node))
    return [(target, node) for target, node in found if target.split(".")[0] == "mlx_smolvlm"]


def graph() -> dict[str, set[str]]:
    return {name: {t for t, _ in imports(name) if t in MODULES and t != name} for name in MODULES}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    assert "mlx_smolvlm.backends.cpu" in MODULES and "mlx_smolvlm.model.model" in MODULES
    assert find_cycle(graph()) is None


def test_model_is_pure_mlx():
    """The model package imports nothing of the project outside itself (no backend)."""
    for name in MODULES:
        if name.startswith("mlx_smolvlm.model"):
            outside = {t for t, _ in imports(name) if not t.startswith("mlx_smolvlm.model")}
            assert not outside, f"{name} imports {outside}"
            source = MODULES[name].read_text()
            assert "os.environ" not in source and "threading" not in source, name


def test_library_packages_do_not_import_the_clis():
    commands = (
        "generate",
        "chat",
        "convert",
        "lora",
        "fuse",
        "server",
        "docling",
        "caption",
        "retrieve",
    )
    clis = {f"mlx_smolvlm.{c}" for c in commands}
    for name in MODULES:
        if name.count(".") > 1 or name == "mlx_smolvlm" or name == "mlx_smolvlm.loading":
            assert not {t for t, _ in imports(name)} & clis, name


def test_imports_at_the_top_of_modules():
    """Imports inside functions only for optional dependencies."""
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                modules = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                )
                roots = {m.split(".")[0] for m in modules}
                assert roots <= OPTIONAL, f"{name}:{node.lineno} imports {modules} in a function"


def test_package_imports_quietly_and_commands_run_without_runpy_warnings():
    """`import mlx_smolvlm` prints nothing and imports no CLI module, so `python -m
    mlx_smolvlm.generate` gets no "found in sys.modules" RuntimeWarning."""
    code = (
        "import sys, mlx_smolvlm; from mlx_smolvlm import batch_generate, generate; "
        "assert callable(batch_generate) and callable(generate); "
        "assert not {'mlx_smolvlm.generate', 'mlx_smolvlm.chat', 'mlx_smolvlm.server'} "
        "& set(sys.modules); "
        # The generate command imported, `generate` is still the function.
        "from mlx_smolvlm.generate import main; from mlx_smolvlm import generate as g; "
        "assert g is generate"
    )
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout == "" and out.stderr == "", out.stderr
    for command in ("generate", "chat"):
        args = [sys.executable, "-W", "error", "-m", f"mlx_smolvlm.{command}", "--help"]
        out = subprocess.run(args, capture_output=True, text=True, env=env)
        assert out.returncode == 0 and out.stderr == "", out.stderr
