"""Writes the exact versions of the environment CI just tested to constraints/tested.txt.

`.ci/run` calls it after the test suite passed, so the file always holds a set known to pass:
`pip install -c constraints/tested.txt --no-build-isolation -e ".[dev]"` installs it. A CI run that passed with
other versions than the committed file says so; committing the refreshed file records them.

    python .ci/tested_versions.py [PATH]   (default: constraints/tested.txt)
"""

from __future__ import annotations

import importlib.metadata
import platform
import re
import sys
from pathlib import Path

HEADER = """\
# Exact versions of the last green `.ci/run` (written by .ci/tested_versions.py; Linux, CPU, Python {python}).
# A known-good set: pip install -c constraints/tested.txt --no-build-isolation -e ".[dev]"
# torch is pinned without its local label (+cpu), so a CUDA build of the same version satisfies it too.
"""
SKIP = {"fastppo", "pip", "setuptools", "wheel"}  # the project itself, and the installers the README upgrades


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> list[str]:
    seen = {}
    for dist in importlib.metadata.distributions():
        name = canonical(dist.metadata["Name"])
        if name not in SKIP:
            seen[name] = dist.version.split("+")[0]  # 2.13.0+cpu -> 2.13.0
    return [f"{name}=={version}" for name, version in sorted(seen.items())]


def main() -> int:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "constraints/tested.txt")
    python = ".".join(platform.python_version_tuple()[:2])
    text = HEADER.format(python=python) + "\n".join(pins()) + "\n"
    old = path.read_text() if path.exists() else None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if old is None or old != text:
        old_pins = set((old or "").splitlines()) - set(HEADER.splitlines())
        changed = sorted(set(text.splitlines()) - old_pins - set(text.splitlines()[:3]))
        print(f"{path}: this green run's versions differ from the committed ones; commit the refreshed file:")
        print("  " + ", ".join(changed) if changed else "  (packages removed)")
    else:
        print(f"{path}: unchanged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
