"""Hardlink installed distributions from this Python's environment into another environment's site-packages.

.ci/vllm_env.sh runs it with the main environment's Python for torch and triton: both environments take the same
wheels (torch 2.13.0+cpu and triton, 1.75 GB unpacked), so linking them keeps one copy on disk; CI machines can be
short of disk. pip in the other environment then finds them installed and keeps them if they satisfy what it asks
for, or unlinks them (the files here stay) and installs its own.

    python link_dists.py DEST_SITE_PACKAGES NAME [NAME ...]

Links every file a distribution's RECORD lists under site-packages (console scripts in bin/ are skipped: their
shebangs name this environment's Python). Exits 1, removing the links it made, when a distribution is missing here
or a link cannot be made (another filesystem); the caller then installs from the index.
"""

import os
import sys
import sysconfig
from importlib.metadata import PackageNotFoundError, distribution


def files_of(name: str, site: str) -> list[str]:
    """Paths, relative to `site`, of the files `name` installed there."""
    dist = distribution(name)
    paths = [os.path.relpath(str(f.locate()), site) for f in dist.files or []]
    return [p for p in paths if not p.startswith(os.pardir) and os.path.isfile(os.path.join(site, p))]


def main(dest: str, names: list[str]) -> int:
    site = sysconfig.get_path("purelib")
    linked: list[str] = []
    try:
        for name in names:
            for rel in files_of(name, site):
                target = os.path.join(dest, rel)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.link(os.path.join(site, rel), target)
                linked.append(target)
            print(f"linked {name} {distribution(name).version} from {site}")
    except (PackageNotFoundError, OSError) as err:
        for target in linked:
            os.unlink(target)
        print(f"link_dists: {err}; installing from the index instead", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2:]))
