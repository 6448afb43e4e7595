"""The GPU proof in one command: the environment, the GPU test selection, the ops at the anchors' shapes and PPO
iterations of a Qwen2-0.5B-shaped model, written to one JSON that `python -m bench.report` renders (docs/gpu.md).

    python bench/gpu_proof.py [--results-dir DIR] [--commit SHA] [--parts tests,ops]
    python bench/gpu_proof.py --dry-run     # every part at tiny sizes (a CPU will do): checks the script, times nothing

Parts, in order, each with its own time budget (PART_BUDGET_S; time a part leaves unused goes to the next ones):
  environment  device, CUDA capability, versions, commit, and where the machine differs from the one recorded
  tests        `pytest -m gpu` in parallel shards: every op and backend against the float64 reference on CUDA
               tensors, and the trainer end to end on CUDA
  ops          bench/gpu_ops.py: the ops against their unfused torch forms, and a copy's bandwidth in the same process
  ppo          bench/gpu_ppo.py: PPO iterations of a Qwen2-0.5B-shaped model, full fine-tuning and LoRA
All but the first run in child processes (a kernel that faults the CUDA context takes only its own part down), which
report each result as one JSON line the moment it exists (`emit`). A part that fails or runs out of time is recorded
as such and the next one runs; the JSON is rewritten whenever a result arrives, so a run stopped at its time limit
keeps what it measured. Peers' figures are in it as CITED, labelled "cited, not measured"; the targets are reported
against (`evaluate_targets`), never asserted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/gpu_proof.py` puts bench/ on sys.path, not the checkout
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
PARTS = ("environment", "tests", "ops", "ppo")
# Seconds per part: 520 in all, inside the 10 minutes one command may run on a lent GPU, the install included.
PART_BUDGET_S = {"environment": 30, "tests": 200, "ops": 120, "ppo": 170}
DRY_RUN_BUDGET_S = {"environment": 30, "tests": 120, "ops": 90, "ppo": 120}

# The GPU machine as recorded when it was lent (issue #36): the environment part says where this one differs.
RECORDED = {"prefix": "/opt/torch/.venv", "torch": "2.11.0+cu130", "triton": "3.6.0", "transformers": "5.17.0"}
RECORDED_ABSENT = ("bitsandbytes", "vllm", "flash-attn", "trl", "liger-kernel", "datasets")
OTHER_PACKAGES = ("accelerate", "peft", "safetensors", "tokenizers", "numpy", "pytest", "pytest-benchmark", "ninja")

# Peers' published figures at the shapes gpu_ops.py measures: context for the measured rows, never a measurement.
CITED_LABEL = "cited, not measured"
CITED = [
    {"what": "token_logprobs forward N=8192 V=151936 bf16: TRL's fused Triton kernel", "value": "0.89 ms"},
    {"what": "token_logprobs forward N=8192 V=151936 bf16: TRL's torch path", "value": "12.8 ms, 2.32 GiB"},
    {"what": "fused linear cross-entropy fwd+bwd M=8192 H=4096 V=131072 bf16: Liger", "value": "50.4 ms"},
    {"what": "linear + log-softmax fwd+bwd M=8192 H=4096 V=131072 bf16: veRL's torch path", "value": "128.8 ms"},
]
CITED_SOURCES = ("TRL #7244, H100", "TRL #7244, H100", "Liger-Kernel README, H100", "Liger-Kernel README, H100")
for _figure, _source in zip(CITED, CITED_SOURCES, strict=True):
    _figure.update(source=_source, label=CITED_LABEL)

# The anchors' shapes (those of the cited figures) and the names of the groups bench/gpu_ops.py measures them in.
LOGPROBS_SHAPE, LINEAR_SHAPE = (8192, 151936), (8192, 4096, 131072)
LOGPROBS_GROUP = "token_logprobs forward N={} V={} bf16"
LINEAR_GROUP = "linear_token_logprobs+entropy fwd+bwd M={} H={} V={} bf16"
TRL_FUSED_MS, LIGER_MS = 0.89, 50.4


# ----------------------------------------------------------------------------------------------
# what a child process reports: one JSON line per result, appended the moment it exists
# ----------------------------------------------------------------------------------------------


def emit(path: str | Path, **record) -> None:
    """Append one line: row={...} (a measurement), info={...} (facts about the part) or error={...}."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def attempt(path: str | Path, what: str, fn) -> None:
    """Run one benchmark: a failure becomes an error line naming it, and the caller goes on to the next one."""
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - recorded, and the proof goes on
        message = f"{type(error).__name__}: {error}"[:2000]
        print(f"{what}: FAILED {message}", flush=True)
        emit(path, error={"what": what, "error": message, "traceback": traceback.format_exc()[-3000:]})


def child_arguments(doc: str) -> tuple[str, bool, str]:
    """A part's child process: (LINES, --dry-run, the device it measures on) from `python -m bench.<part> LINES`."""
    import torch

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("lines", help="the file the result lines are appended to")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes; the times mean nothing")
    args = parser.parse_args()
    return args.lines, args.dry_run, "cuda" if torch.cuda.is_available() else "cpu"


def read_lines(path: Path) -> list[dict]:
    """The complete lines written so far (a line still being written is left for the next read)."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines(keepends=True)
    return [json.loads(line) for line in lines if line.endswith("\n") and line.strip()]


def write_json(path: Path, data: dict) -> None:
    """Replace the file whole (write a sibling, then rename): no reader and no kill ever sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# child processes under a deadline
# ----------------------------------------------------------------------------------------------


def run_children(commands, envs, outputs, deadline: float, jobs: int, on_poll) -> list[dict]:
    """Run `commands` (each with its env, stdout and stderr to its output file), `jobs` at a time, each until it ends
    or `deadline` (time.monotonic()) passes; `on_poll()` runs every half second. A child leads its own process
    group, so a kill takes whatever it started too (Triton's compiles)."""
    results = [{"status": "not started"} for _ in commands]
    pending, running = list(range(len(commands))), {}
    while pending or running:
        while pending and len(running) < jobs and time.monotonic() < deadline:
            i = pending.pop(0)
            with open(outputs[i], "w") as out:
                process = subprocess.Popen(
                    commands[i], cwd=ROOT, env=envs[i], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
            running[i] = (process, time.monotonic())
        if not running:
            break
        time.sleep(0.5)
        for i, (process, started) in list(running.items()):
            if process.poll() is None and time.monotonic() < deadline:
                continue
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                results[i] = {"status": "timeout"}
            else:
                results[i] = {"status": "ok" if process.returncode == 0 else "failed", "returncode": process.returncode}
            results[i]["seconds"] = round(time.monotonic() - started, 1)
            del running[i]
        on_poll()
    return results


# ----------------------------------------------------------------------------------------------
# part 1: the environment
# ----------------------------------------------------------------------------------------------


def environment(commit: str | None) -> dict:
    import torch

    from bench.machine import machine_info, package_version
    from fastppo.ops import dispatch

    info = machine_info()
    info.update(python=sys.version.split()[0], executable=sys.executable, prefix=sys.prefix)
    if commit:
        info["commit"] = commit
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(cuda=torch.version.cuda, capability=f"{props.major}.{props.minor}")
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    info["packages"] = {name: package_version(name) for name in OTHER_PACKAGES}
    found = {"prefix": sys.prefix, "torch": torch.__version__, "triton": info["triton"]}
    found["transformers"] = info["transformers"]
    differences = [
        f"{key}: recorded {value}, found {found[key]}" for key, value in RECORDED.items() if found[key] != value
    ]
    present = [name for name in RECORDED_ABSENT if package_version(name)]
    differences += [f"{name}: recorded absent, found {package_version(name)}" for name in present]
    info["recorded_machine"] = {"matches": not differences, "differences": differences}
    info["backends_on_cuda"] = {row["op"]: row["backend"] for row in dispatch.report(("cuda",))}
    info["native_cpu_kernels"] = dispatch.unavailable_reason("native", "gae", "cpu") or "available"
    return info


# ----------------------------------------------------------------------------------------------
# part 2: the GPU test selection, `pytest -m gpu`, in shards run side by side
# ----------------------------------------------------------------------------------------------


def summarize_tests(logs: list[Path]) -> dict:
    """Counts by outcome and the failures with their messages, from the shards' bench/pytest_log.py lines."""
    lines = [line for path in logs for line in read_lines(path)]
    tests = [line for line in lines if "nodeid" in line]
    counts: dict[str, int] = {}
    for line in tests:
        counts[line["outcome"]] = counts.get(line["outcome"], 0) + 1
    shards = [line for line in lines if "shard" in line]
    out = {"selected": sum(s["selected"] for s in shards), "counts": counts}
    out["collected"] = shards[0]["collected"] if shards else None  # every shard collects the whole selection
    ran = {line["nodeid"] for line in tests if line["when"] != "collect"}
    out["not_run"] = out["selected"] - len(ran)  # of the shards that started
    out["failures"] = [line for line in tests if line["outcome"] in ("failed", "error")][:50]
    return out


def run_tests(part: dict, save, env: dict, workdir: Path, deadline: float, dry_run: bool) -> str:
    """`pytest -m gpu tests` in `jobs` shards at once (bench/pytest_log.py picks each one's tests)."""
    import torch

    cores = os.cpu_count() or 1
    # In parallel where a GPU is: the kernels compile on the CPU, one compile per process at a time.
    jobs = min(8, max(1, cores // 2)) if torch.cuda.is_available() else 1
    logs = [workdir / f"tests-{i}.jsonl" for i in range(jobs)]
    outputs = [workdir / f"tests-{i}.log" for i in range(jobs)]
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-p", "bench.pytest_log"]
    command += ["--continue-on-collection-errors", "tests"]  # a module that fails to import is one error line
    shard_env = dict(env, OMP_NUM_THREADS=str(max(1, cores // jobs)), FASTPPO_TEST_SAMPLE="1" if dry_run else "0")
    envs = [dict(shard_env, FASTPPO_TEST_LOG=str(log), FASTPPO_TEST_SHARD=f"{i}/{jobs}") for i, log in enumerate(logs)]

    shown = [time.monotonic()]

    def poll():
        part.update(summarize_tests(logs))
        save()
        if time.monotonic() - shown[0] > 30:  # progress for whoever watches the command's output
            shown[0] = time.monotonic()
            print(f"  tests: {part['counts']} of {part['selected']} selected", flush=True)

    results = run_children([command] * jobs, envs, outputs, deadline, jobs, poll)
    part["shards"] = [dict(result, output=output.name) for result, output in zip(results, outputs, strict=True)]
    poll()
    if any(r["status"] in ("timeout", "not started") for r in results):
        return "timeout"
    return "failed" if part["failures"] or any(r["status"] != "ok" for r in results) else "ok"


# ----------------------------------------------------------------------------------------------
# parts 3 and 4: the benchmarks, each one child process writing result lines
# ----------------------------------------------------------------------------------------------


def run_benchmarks(module: str, part: dict, save, env: dict, workdir: Path, deadline: float, dry_run: bool) -> str:
    lines, output = workdir / f"{module}.jsonl", workdir / f"{module}.log"
    command = [sys.executable, "-m", f"bench.{module}", str(lines)] + (["--dry-run"] if dry_run else [])
    shown = 0

    def poll():
        nonlocal shown
        got = read_lines(lines)
        rows = {line["row"].get("key", i): line["row"] for i, line in enumerate(got) if "row" in line}
        part["rows"] = list(rows.values())  # a row with a "key" replaces the one written before it
        part["errors"] = [line["error"] for line in got if "error" in line]
        for line in got:
            part.update(line.get("info", {}))
        for line in got[shown:]:
            print(f"  {module}: {json.dumps(line)[:240]}", flush=True)
        shown = len(got)
        save()

    [result] = run_children([command], [env], [output], deadline, 1, poll)
    part["child"] = result
    if result["status"] != "ok":
        print(f"  {module}: {result['status']}; the end of {output}:\n" + output.read_text()[-3000:], flush=True)
        return result["status"]
    return "partial" if part["errors"] else "ok"


# ----------------------------------------------------------------------------------------------
# the targets, reported against and never asserted
# ----------------------------------------------------------------------------------------------


def find_row(data: dict, group: str, impl_prefix: str = "fastppo") -> dict | None:
    rows = data.get("parts", {}).get("ops", {}).get("rows", [])
    return next((r for r in rows if r["group"] == group and r["impl"].startswith(impl_prefix)), None)


def evaluate_targets(data: dict) -> list[dict]:
    """Each target with what was measured against it and whether it was met (None: not measured, or a dry run)."""
    dry = data.get("dry_run", False)

    def target(text: str, measured: str | None, met: bool | None) -> dict:
        if dry:
            return {"target": text, "measured": None, "met": None, "note": "dry run: nothing measured"}
        return {"target": text, "measured": measured, "met": met if measured is not None else None}

    logprobs = find_row(data, LOGPROBS_GROUP.format(*LOGPROBS_SHAPE))
    linear = find_row(data, LINEAR_GROUP.format(*LINEAR_SHAPE))
    copied = logprobs if logprobs and logprobs.get("of_copy") is not None else None
    out = [
        target(
            "token_logprobs forward, N=8192 V=151936 bf16: >= 85% of the copy bandwidth measured in the same process",
            copied and f"{logprobs['of_copy']:.0%} ({logprobs['gb_per_s']:.0f} GB/s)",
            copied and logprobs["of_copy"] >= 0.85,
        ),
        target(
            f"token_logprobs forward, N=8192 V=151936 bf16: <= {TRL_FUSED_MS} ms (TRL #7244's fused kernel, cited)",
            logprobs and f"{logprobs['ms']:.3f} ms",
            logprobs and logprobs["ms"] <= TRL_FUSED_MS,
        ),
        target(
            f"linear_token_logprobs + entropy fwd+bwd, M=8192 H=4096 V=131072 bf16: <= {LIGER_MS} ms (Liger, cited)",
            linear and f"{linear['ms']:.1f} ms",
            linear and linear["ms"] <= LIGER_MS,
        ),
        target(
            "the same: working memory <= 1/8 of the bf16 logits'",
            linear
            and f"{linear['working_mb']:.0f} MiB = {linear['working_of_logits']:.3f} of {linear['logits_mb']:.0f}",
            linear and linear["working_of_logits"] <= 1 / 8,
        ),
    ]
    for row in data.get("parts", {}).get("ppo", {}).get("rows", []):
        share = row["phase_seconds"][row["dominant_phase"]] / max(sum(row["phase_seconds"].values()), 1e-9)
        measured = f"{row['seconds_per_iteration']:.2f} s, {row['dominant_phase']} {share:.0%} of the phases"
        out.append(target(f"Qwen2-0.5B-shaped PPO iteration ({row['mode']}): the dominant phase named", measured, None))
    return out


# ----------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python bench/gpu_proof.py", description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, any device; JSON to a temporary folder")
    parser.add_argument("--results-dir", help="where the JSON goes (default bench/results/; a temporary folder dry)")
    parser.add_argument("--commit", help="the commit measured, where the checkout has no .git (a copied tree)")
    parser.add_argument("--parts", default=",".join(PARTS[1:]), help="which of tests,ops,ppo to run (all)")
    return parser.parse_args(argv)


def refuse(message: str) -> int:
    print(f"gpu_proof: {message}", file=sys.stderr)
    return 2


def run_part(name: str, data: dict, save, env: dict, workdir: Path, deadline: float, args) -> None:
    """One part, its outcome recorded whatever happens: ok, partial, failed, timeout, or error with its traceback."""
    part = data["parts"][name] = {"status": "running"}
    began = time.monotonic()
    print(f"gpu_proof: {name}", flush=True)
    try:
        if name == "environment":
            data["machine"] = environment(args.commit)
            print(json.dumps(data["machine"], indent=1), flush=True)
            status = "ok"
        elif name == "tests":
            status = run_tests(part, save, env, workdir, deadline, args.dry_run)
        else:
            module = {"ops": "gpu_ops", "ppo": "gpu_ppo"}[name]
            status = run_benchmarks(module, part, save, env, workdir, deadline, args.dry_run)
    except Exception as error:  # noqa: BLE001 - recorded; the next part runs
        status = "error"
        part["error"] = f"{type(error).__name__}: {error}"[:2000]
        part["traceback"] = traceback.format_exc()[-3000:]
    part.update(status=status, seconds=round(time.monotonic() - began, 1))
    print(f"gpu_proof: {name} {status} in {part['seconds']} s", flush=True)
    save()


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    wanted = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(wanted) - set(PARTS[1:]))
    if unknown:
        return refuse(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(PARTS[1:])}")
    if not args.dry_run and not torch.cuda.is_available():
        return refuse("no CUDA device here: the proof's sizes are a GPU's; --dry-run checks the script on a CPU")
    if args.results_dir:
        results_dir = Path(args.results_dir)
    else:
        results_dir = Path(tempfile.mkdtemp(prefix="fastppo-gpu-proof-")) if args.dry_run else RESULTS
    if args.dry_run and results_dir.resolve() == RESULTS.resolve():
        return refuse(f"--results-dir: a dry run's JSON never goes to {RESULTS} (its times mean nothing)")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = results_dir / f"gpu-proof-{stamp}{'-dry-run' if args.dry_run else ''}.json"
    workdir = results_dir / f"{path.stem}-logs"
    workdir.mkdir(parents=True, exist_ok=True)
    budgets = DRY_RUN_BUDGET_S if args.dry_run else PART_BUDGET_S
    data = {"kind": "gpu-proof", "dry_run": args.dry_run, "date": stamp, "budget_s": budgets, "machine": {}}
    data.update(parts={}, cited=CITED, targets=[])

    def save():
        write_json(path, data)

    print(f"gpu_proof: writing {path}", flush=True)
    # The native CPU kernels are not what this measures: a missing build is not compiled here, in this process (the
    # environment part asks which backends exist) or its children (minutes of the ten).
    os.environ.setdefault("FASTPPO_NO_JIT_BUILD", "1")
    env = dict(os.environ)
    if args.dry_run and not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"  # the Triton kernels in Triton's interpreter, as the CPU test suite runs them
    start, budget = time.monotonic(), 0.0
    for name in ["environment", *[p for p in PARTS[1:] if p in wanted]]:
        budget += budgets[name]  # a part may use what the ones before it left
        run_part(name, data, save, env, workdir, start + budget, args)
    try:
        data["targets"] = evaluate_targets(data)
    except Exception as error:  # noqa: BLE001 - the measurements are written whatever happens here
        data["targets_error"] = f"{type(error).__name__}: {error}"
    save()
    for t in data["targets"]:
        verdict = "n/a" if t["met"] is None else "met" if t["met"] else "NOT met"
        print(f"target: {t['target']}: {t['measured']} ({verdict})")
    print(f"gpu_proof: {path}")
    return 0 if all(p["status"] == "ok" for p in data["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
