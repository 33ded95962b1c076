"""The package's layers (docs/architecture.md), checked on the source: arrows point down
only, no import cycle, the core (and ``import gpucnn``) imports neither Hydra nor MLflow,
only the array layer imports CuPy, and the compute code above it (nn, parallel, fit)
imports no NumPy except where it handles host arrays only."""

from __future__ import annotations

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gpucnn"

# Each part of the package and the parts it may import (besides itself). A module's part
# is its folder under gpucnn/ or, at the top, its own name; tracking/ has two parts: the
# interface the loop uses, and the MLflow edge.
MAY_IMPORT = {
    "array": set(),
    "nn": {"array"},
    "data": {"interrupts"},  # host NumPy arrays: no backend, no model; a download stops
    "parallel": {"array", "nn", "interrupts"},  # MPI ranks agree on a requested stop
    "interrupts": set(),
    "tracking": {"tracking.tracker"},  # tracking/__init__.py: the interface's names
    "tracking.tracker": set(),
    "tracking.liveness": set(),  # which process a run belongs to, whether it lives
    "tracking.pictures": set(),  # numbers as pictures: signed colour scale, grids, PNG
    "fit": {"array", "nn", "parallel", "data", "interrupts", "tracking.tracker"},
    # the edge: entry points and what only they use
    "tracking.mlflow_store": {"interrupts", "tracking.tracker", "tracking.liveness"},
    "config": {"array", "nn", "data"},
    "callbacks": {"tracking.mlflow_store", "tracking.liveness"},
    "train": {
        "array",
        "nn",
        "parallel",
        "data",
        "fit",
        "interrupts",
        "tracking.tracker",
        "tracking.mlflow_store",
        "tracking.liveness",
        "config",
        "resume",
        "report",
    },
    "resume": {
        "nn",
        "tracking.mlflow_store",
    },  # what a resumed run goes on from, and the overrides it takes
    "evaluate": {"array", "nn", "data", "fit", "tracking.mlflow_store"},
    "explain": {"array", "nn", "inside", "report"},  # the last two for a trained model
    "inside": {"array", "nn", "tracking", "tracking.pictures"},  # one image, layer by layer
    # a run's report.html: from the store, the checkpoint, the data and the model
    "report": {"array", "nn", "data", "fit", "evaluate", "tracking", "tracking.pictures"}
    | {"tracking.mlflow_store"},
    "gpucnn": {"array", "nn", "parallel"},  # gpucnn/__init__.py: the public names
}
CORE = (
    "array",
    "nn",
    "data",
    "parallel",
    "interrupts",
    "tracking",
    "tracking.tracker",
    "tracking.pictures",
    "fit",
)
# What runs without the train extra (no Hydra, no MLflow installed): the core, the public
# names (import gpucnn) and the lecture's walk-through.
WITHOUT_TRAIN_EXTRA = (*CORE, "gpucnn", "explain", "inside")
EDGE_LIBRARIES = {"hydra", "omegaconf", "mlflow"}
# Outside the array layer, only code that handles host arrays alone imports NumPy: files
# (checkpoints, datasets), the worker processes' shared memory, pictures, the edge.
HOST_NUMPY = {"nn.checkpoint", "parallel.workers", "parallel.mpi"}


def module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def source(module: str) -> Path:
    path = ROOT / Path(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imports(module: str) -> list[tuple[str, int]]:
    """(imported module, line) for every import in ``module``, inside functions too; a
    name imported from a package is resolved to its submodule where it is one."""
    tree = ast.parse(source(module).read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                is_module = candidate.startswith("gpucnn") and (
                    source(candidate).is_file() if candidate.count(".") else False
                )
                found.append((candidate if is_module else node.module, node.lineno))
    return found


def part(module: str) -> str:
    inner = module.split(".")[1:]
    if not inner:
        return "gpucnn"
    if inner[0] == "tracking" and len(inner) > 1:
        return f"tracking.{inner[1]}"
    return inner[0]


def internal_graph() -> dict[str, set[str]]:
    modules = set(module_names())
    return {
        module: {target for target, _ in imports(module) if target in modules} for module in modules
    }


def test_every_module_belongs_to_a_part_of_the_contract():
    """A new folder or top-level module needs its line in MAY_IMPORT (and in
    docs/architecture.md); a line with no module left is stale."""
    assert {part(m) for m in module_names()} == set(MAY_IMPORT)


def test_arrows_point_down_only():
    wrong = [
        f"{module} ({part(module)}) imports {target} ({part(target)})"
        for module, targets in internal_graph().items()
        for target in targets
        if part(target) != part(module) and part(target) not in MAY_IMPORT[part(module)]
    ]
    assert not wrong, "\n".join(wrong)


def test_there_is_no_import_cycle():
    graph = internal_graph()
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return [*path, module, target]
            if target not in state:
                cycle = visit(target, [*path, module])
                if cycle:
                    return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module, [])
            assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize("module", [m for m in module_names() if part(m) in WITHOUT_TRAIN_EXTRA])
def test_the_core_imports_neither_hydra_nor_mlflow(module):
    found = {name.split(".")[0] for name, _ in imports(module)} & EDGE_LIBRARIES
    assert not found, f"{module} imports {found}"


@pytest.mark.parametrize("module", [m for m in module_names() if part(m) != "array"])
def test_only_the_array_layer_knows_the_backend(module):
    """No CuPy outside array/; no NumPy in the compute code above it (the layers, the
    model, the batch split, the loop): they take the array module from the arrays."""
    roots = {name.split(".")[0] for name, _ in imports(module)}
    assert "cupy" not in roots
    if part(module) in ("nn", "parallel", "fit") and module.split(".", 1)[1] not in HOST_NUMPY:
        assert "numpy" not in roots, f"{module} imports numpy"


@pytest.mark.slow  # a fresh interpreter per module: seconds
def test_each_module_imports_alone_without_hydra_or_mlflow_in_the_core():
    """In a fresh interpreter each: nothing depends on another module having been
    imported first, and importing a core module loads no edge library."""
    code = (
        "import importlib, sys; importlib.import_module(sys.argv[1]); "
        "print(','.join(sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[2:]))))"
    )

    def load(module: str) -> tuple[str, subprocess.CompletedProcess]:
        command = [sys.executable, "-c", code, module, *EDGE_LIBRARIES]
        return module, subprocess.run(command, capture_output=True, text=True, cwd=ROOT)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(load, module_names()))
    for module, result in results:
        assert result.returncode == 0, f"import {module}:\n{result.stderr}"
        if part(module) in WITHOUT_TRAIN_EXTRA:
            assert result.stdout.strip() == "", f"{module} loads {result.stdout.strip()}"
