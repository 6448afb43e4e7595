"""The checkout never shadows an installed package, and a plain install carries the kernels as `fastppo.kernels`.

From the repository root, pytest, `python -m bench`, `python -c` and `torchrun -m` put the checkout on `sys.path`
ahead of site-packages, so any top-level folder or module of the checkout whose name an installed distribution also
provides would be imported in its place. That happened with `kernels/` once transformers began importing Hugging
Face's `kernels` package.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def checkout_top_level_names() -> dict[str, Path]:
    """What `import <name>` could find in the checkout's root: folders of Python files (packages, or namespace
    portions without `__init__.py`, like kernels/) and modules."""
    names = {}
    for path in ROOT.iterdir():
        if path.name.startswith(".") or path.name.endswith(".egg-info"):
            continue
        if path.is_dir() and any(path.glob("*.py")):
            names[path.name] = path
        elif path.is_file() and path.suffix == ".py":
            names[path.stem] = path
    return names


def import_from_root(code: str, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    """`python -c code` from the repository root, as a user would run it (the root is sys.path[0])."""
    env = dict(os.environ)
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_no_folder_of_the_checkout_shadows_an_installed_distribution():
    provided = importlib.metadata.packages_distributions()  # top-level name -> distributions
    ours = checkout_top_level_names()
    assert "kernels" in ours, "kernels/ holds Python files: this test must see it"
    clashes = sorted(name for name in ours if name != "fastppo" and set(provided.get(name, [])) - {"fastppo"})
    for name in clashes:
        proc = import_from_root(f"import {name}; print({name}.__file__)")
        assert proc.returncode == 0, proc.stderr
        imported = Path(proc.stdout.strip()).resolve()
        assert imported != ours[name] and ours[name] not in imported.parents, (
            f"`import {name}` from the repository root imports the checkout's {ours[name]} instead of the installed "
            f"distribution {provided[name]}"
        )


def test_an_installed_kernels_package_wins_over_the_kernels_folder(tmp_path):
    """Whatever installed package is called `kernels` (Hugging Face's today) wins over the checkout's folder."""
    installed = tmp_path / "kernels"
    installed.mkdir()
    (installed / "__init__.py").write_text("WHOSE = 'installed'\n")
    # PYTHONPATH comes after the root (sys.path[0]) and before site-packages: the installed copy is found here first.
    proc = import_from_root("import kernels; print(kernels.WHOSE, kernels.__file__)", extra_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["installed", str(installed / "__init__.py")]


def test_without_an_installed_kernels_package_the_folder_is_an_empty_namespace():
    """No code of the checkout runs as `kernels`: an empty namespace is what transformers takes for "not installed"."""
    code = (
        "import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p]; import kernels; "
        "print(getattr(kernels, '__file__', None), hasattr(kernels, 'FP_FUSION'), hasattr(kernels, 'gae'))"
    )
    proc = import_from_root(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["None", "False", "False"]


def test_the_kernels_import_as_fastppo_kernels_from_the_root():
    proc = import_from_root("import fastppo.kernels.gae as gae; print(gae.FP_FUSION, gae.__name__)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "fastppo.kernels.gae"]


@pytest.mark.slow
def test_a_plain_install_carries_the_kernels_and_sources_inside_fastppo(tmp_path):
    """`pip install .` (a wheel): `kernels/` lands in fastppo/kernels/, `csrc/` in fastppo/csrc/, nothing at the top."""
    env = dict(os.environ, FASTPPO_SKIP_NATIVE="1", PIP_NO_INDEX="1")
    source = tmp_path / "source"  # a clean copy: setuptools reuses a checkout's build/ folder, stale files included
    ignore = shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "*.so", "results")
    shutil.copytree(ROOT, source, ignore=ignore)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
        + [str(source)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("fastppo-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"fastppo"}, top_level
    kernel_files = {Path(name).name for name in names if name.startswith("fastppo/kernels/")}
    assert kernel_files == {path.name for path in (ROOT / "kernels").glob("*.py")}
    assert {Path(name).name for name in names if name.startswith("fastppo/csrc/")} >= {"common.h", "gae.cpp"}

    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)  # what pip installs into site-packages, without the metadata step
    code = "import fastppo.kernels.gae as g, fastppo.ops.native_build as nb; print(g.__file__); print(nb.source_dir())"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(target)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert all(line.startswith(str(target)) for line in proc.stdout.split()), proc.stdout


def declared_requirements() -> dict[str, str]:
    """pyproject.toml's core dependencies: canonical name -> specifier."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(line) for line in project["dependencies"]]
    return {r.name.lower(): r.specifier for r in requirements}


def test_the_lower_bound_environment_pins_the_declared_lower_bounds():
    """.ci/vllm_env.sh installs transformers and torch at exactly pyproject.toml's lower bounds."""
    declared = declared_requirements()
    script = (ROOT / ".ci" / "vllm_env.sh").read_text()
    for name in ("torch", "transformers"):
        (bound,) = [s.version for s in declared[name] if s.operator == ">="]
        assert f'"{name}=={bound}"' in script or f" {name}=={bound}" in script, (name, bound)


def test_the_tested_constraints_pin_every_core_dependency_within_its_range():
    from packaging.version import Version

    lines = (ROOT / "constraints" / "tested.txt").read_text().splitlines()
    pinned = dict(line.split("==") for line in lines if line and not line.startswith("#"))
    for name, specifier in declared_requirements().items():
        assert name in pinned, f"constraints/tested.txt lacks {name}"
        assert Version(pinned[name]) in specifier, f"{name}=={pinned[name]} is outside {specifier}"
