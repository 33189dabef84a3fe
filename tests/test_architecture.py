"""The floors of ARCHITECTURE.md: a package imports only from its own floor or lower ones (lazy imports inside
functions included), so each layer can be read and tested without the ones above it; and no module imports
itself back through others (no import loops)."""

from __future__ import annotations

import ast
import subprocess

from common.paths import REPO_ROOT

FLOORS = {"common": 0, "models": 1, "datamodules": 2, "tools": 2, "lightning_modules": 3, "callbacks": 3,
          "cheaplunch": 4, "train": 5, "finetune": 5, "bakeoff": 5}


def imported_modules(source: str) -> set[str]:
    """Dotted names of every absolute import in the source, at module level or inside functions (for
    ``from a.b import c``: both a.b and a.b.c, whichever of them is a module)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def imported_packages(source: str) -> set[str]:
    return {name.split(".")[0] for name in imported_modules(source)}


def project_files() -> list[str]:
    return subprocess.run(["git", "ls-files", "*.py"], cwd=REPO_ROOT, capture_output=True, text=True,
                          check=True).stdout.split()


def test_imports_only_go_down_the_floors():
    checked, upward = 0, []
    for name in project_files():
        package = name.split("/")[0].removesuffix(".py")
        if package not in FLOORS:
            continue  # tests/, benchmarks/, scripts/ may import anything
        checked += 1
        for target in imported_packages((REPO_ROOT / name).read_text()) & FLOORS.keys():
            if FLOORS[target] > FLOORS[package]:
                upward.append(f"{name} imports {target} (floor {FLOORS[target]} > {FLOORS[package]})")
    assert checked > 50 and upward == []


def test_the_checker_sees_lazy_imports():
    source = "import os\n\ndef f():\n    from cheaplunch.config import load_config\n    import models.heads\n"
    assert imported_packages(source) == {"os", "cheaplunch", "models"}


def test_no_import_loops():
    modules = {f.removesuffix(".py").replace("/", ".").removesuffix(".__init__"): f for f in project_files()
               if f.split("/")[0].removesuffix(".py") in FLOORS}
    graph = {m: (imported_modules((REPO_ROOT / f).read_text()) & modules.keys()) - {m} for m, f in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def loop_from(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                return [*path, module, dep]
            if dep not in state and (found := loop_from(dep, [*path, module])):
                return found
        state[module] = 2
        return None

    loops = [found for m in sorted(graph) if m not in state and (found := loop_from(m, []))]
    assert len(graph) > 50 and loops == []
