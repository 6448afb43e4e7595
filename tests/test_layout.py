"""The package layout is the architecture: each subpackage imports only the layers below it, and no module reaches
into another's private names. Function-level imports count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fastppo"

BASE = {"ops", "kernels", "_C"}  # _C: the compiled native kernels
# What each part of fastppo may import (besides itself). `fastppo/__init__.py` is the public API and may import any.
ALLOWED = {
    "kernels": {"kernels"},
    "ops": BASE,
    "runtime": BASE,
    "packing": BASE,  # padded batches in and out of packed rows: beside the models, below them
    "models": BASE | {"runtime", "packing"},
    "data": BASE | {"runtime"},
    "engines": BASE | {"runtime", "packing", "models", "data"},
    "stages": BASE | {"runtime", "packing", "models", "data", "engines"},
    "ppo": BASE | {"runtime", "packing", "models", "data", "engines"},
    "demo": BASE | {"runtime", "packing", "models", "data", "engines", "stages", "ppo"},
    "cli": BASE | {"runtime", "packing", "models", "data", "engines", "stages", "ppo", "demo"},
}


def part_of(module: str) -> str:
    """fastppo.ppo.trainer -> "ppo"; fastppo.models -> "models"; fastppo and fastppo.__main__ -> "" (the API)."""
    part = module.split(".")[1] if module.count(".") >= 1 else ""
    return "" if part == "__main__" else part


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def fastppo_imports(path: Path, module: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import of a fastppo module in `path`."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "fastppo"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.split(".")[0] != "fastppo":
                continue
            names = [a.name for a in node.names]
            if target == "fastppo":  # `from fastppo import ops`: the names are modules
                found += [(f"fastppo.{name}", [], node.lineno) for name in names]
            else:
                found.append((target, names, node.lineno))
    return found


ALL = modules()


def test_every_part_of_the_package_is_known():
    assert {part_of(m) for m in ALL} - {""} == set(ALLOWED)


@pytest.mark.parametrize("module", sorted(m for m in ALL if part_of(m)))
def test_imports_point_down(module):
    own = part_of(module)
    wrong = [
        f"line {line}: {target}"
        for target, _, line in fastppo_imports(ALL[module], module)
        if part_of(target) and part_of(target) != own and part_of(target) not in ALLOWED[own]
    ]
    assert not wrong, f"{module} ({own}) may import only {sorted(ALLOWED[own])}: {wrong}"


@pytest.mark.parametrize("module", sorted(ALL))
def test_no_private_names_cross_modules(module):
    private = [
        f"line {line}: {name} from {target}"
        for target, names, line in fastppo_imports(ALL[module], module)
        for name in names
        if name.startswith("_") and target != module
    ]
    assert not private, f"{module} imports private names of other modules: {private}"


def test_the_checks_see_a_wrong_import(tmp_path):
    """The test would catch `runtime` importing the PPO loop, and a private name taken across modules."""
    path = tmp_path / "checkpoint.py"
    path.write_text("def f():\n    from fastppo.ppo.advantages import uses_critic\n    from ..ppo import config\n")
    targets = [t for t, _, _ in fastppo_imports(path, "fastppo.runtime.checkpoint")]
    assert targets == ["fastppo.ppo.advantages", "fastppo.ppo"]
    assert all(part_of(t) not in ALLOWED["runtime"] for t in targets)
    path.write_text("from fastppo.ppo.config import _check_type\n")
    assert fastppo_imports(path, "fastppo.stages.dpo_config") == [("fastppo.ppo.config", ["_check_type"], 1)]
