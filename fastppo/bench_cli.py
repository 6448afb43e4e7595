"""`fastppo bench`: the benchmark suite in the repository's `bench/` folder (not part of the installed package)."""

from __future__ import annotations

import sys
from pathlib import Path

from fastppo.errors import InputError

REPO = Path(__file__).resolve().parent.parent


def _bench_module():
    if not (REPO / "bench" / "__main__.py").is_file():
        raise InputError(f"no bench/ folder next to the fastppo package ({REPO}); run from a source checkout")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import bench.__main__ as bench_main

    return bench_main


def add_arguments(parser) -> None:
    try:
        _bench_module().add_arguments(parser)
    except InputError:
        pass  # reported by run()


def run(args) -> int:
    return _bench_module().run(args)
