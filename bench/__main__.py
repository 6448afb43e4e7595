"""`python -m bench` (from the repository root): run the suite, save JSON under bench/results/, refresh bench/README.md.

python -m bench              # ops + end to end
python -m bench --ops        # op benchmarks only
python -m bench --e2e        # one PPO iteration, fastppo against TRL
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
    parser.add_argument("--e2e", action="store_true", help="end-to-end PPO iteration only")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for checking the harness")
    parser.add_argument("--plot", action="store_true", help="also draw bench/results/<stamp>.png")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite bench/README.md")


def run(args) -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    suffix = "-quick" if args.quick else ""
    env = {**os.environ, "FASTPPO_BENCH_QUICK": "1" if args.quick else "0"}
    run_ops, run_e2e = args.ops or not args.e2e, args.e2e or not args.ops
    ops_path = e2e_path = None
    if run_ops:
        ops_path = RESULTS / f"ops-{stamp}{suffix}.json"
        print(f"op benchmarks -> {ops_path.relative_to(ROOT)}")
        command = [sys.executable, "-m", "pytest", "bench/bench_ops.py", "-q", "-p", "no:warnings",
                   f"--benchmark-json={ops_path}", "--benchmark-columns=median,iqr,rounds"]  # fmt: skip
        if subprocess.call(command, cwd=ROOT, env=env) != 0:
            return 1
    if run_e2e:
        from bench import e2e

        e2e_path = RESULTS / f"e2e-{stamp}{suffix}.json"
        e2e.main(e2e_path, quick=args.quick)
    from bench import report

    if not args.no_readme and not args.quick:
        report.update_readme(ops_path or report.newest("ops-*.json"), e2e_path or report.newest("e2e-*.json"))
    print(report.render(ops_path, e2e_path))
    if args.plot:
        from bench import plot

        print(f"figure -> {plot.draw(ops_path, e2e_path, RESULTS / f'{stamp}{suffix}.png')}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
