"""The floors of ARCHITECTURE.md: a package imports only from its own floor or lower ones (lazy imports inside
functions included), so each layer can be read and tested without the ones above it."""

from __future__ import annotations

import ast
import subprocess

from common.paths import REPO_ROOT

FLOORS = {"common": 0, "models": 1, "datamodules": 2, "tools": 2, "lightning_modules": 3, "callbacks": 3,
          "cheaplunch": 4, "train": 5, "finetune": 5, "bakeoff": 5}


def imported_packages(source: str) -> set[str]:
    """Top-level names of every absolute import in the source, at module level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_imports_only_go_down_the_floors():
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO_ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    checked, upward = 0, []
    for name in files:
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
