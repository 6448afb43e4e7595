"""`python -m bench` (from the repository root): run the suite, save JSON under bench/results/, refresh bench/README.md.

python -m bench              # ops + end to end
python -m bench --ops        # op benchmarks only
python -m bench --e2e        # PPO end to end, fastppo against TRL (--large: also the 12-layer model, ~15 minutes)
python -m bench --quick      # tiny sizes: checks the harness in seconds, numbers mean nothing
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ops", action="store_true", help="op benchmarks only")
    parser.add_argument("--e2e", action="store_true", help="end-to-end PPO only")
    parser.add_argument("--large", action="store_true", help="end to end on the large model too (hidden 768)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for checking the harness")
    parser.add_argument("--plot", action="store_true", help="also draw bench/results/<stamp>.png")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite bench/README.md")


def run(args) -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    suffix = "-quick" if args.quick else ""
    env = {**os.environ, "FASTPPO_BENCH_QUICK": "1" if args.quick else "0"}
    run_ops, run_e2e = args.ops or not args.e2e, args.e2e or not args.ops
    ops_path = None
    e2e_paths = []
    if run_ops:
        ops_path = RESULTS / f"ops-{stamp}{suffix}.json"
        print(f"op benchmarks -> {ops_path.relative_to(ROOT)}")
        command = [
            sys.executable,
            "-m",
            "pytest",
            "bench/bench_ops.py",
            "-q",
            "-p",
            "no:warnings",
            f"--benchmark-json={ops_path}",
            "--benchmark-columns=median,iqr,rounds",
        ]
        if subprocess.call(command, cwd=ROOT, env=env) != 0:
            return 1
    if run_e2e:
        from bench import e2e

        for size in ["quick"] if args.quick else ["default"] + (["large"] if args.large else []):
            e2e_paths.append(RESULTS / f"e2e-{size}-{stamp}.json")
            e2e.main(e2e_paths[-1], size)
    from bench import report

    if not args.no_readme and not args.quick:
        report.update_readme(ops_path or report.newest("ops-*.json"), report.newest_e2e())
    print(report.render(ops_path, e2e_paths))
    if args.plot:
        from bench import plot

        e2e_path = e2e_paths[0] if e2e_paths else None
        print(f"figure -> {plot.draw(ops_path, e2e_path, RESULTS / f'{stamp}{suffix}.png')}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
