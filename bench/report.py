"""Turn benchmark JSON from `bench/results/` into the Markdown tables of `bench/README.md` (never typed by hand).

    python -m bench.report [ops.json] [e2e.json ...]     # default: the newest of each kind in bench/results/

The README keeps its prose; only the text between `<!-- results:begin -->` and `<!-- results:end -->` is replaced.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
README = Path(__file__).parent / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def newest(pattern: str) -> Path | None:
    files = sorted(RESULTS.glob(pattern))
    return files[-1] if files else None


def newest_e2e() -> list[Path]:
    """The newest end-to-end result of each size (e2e-<size>-<stamp>.json)."""
    return [p for p in (newest(f"e2e-{size}-*.json") for size in ("default", "large")) if p]


def machine_line(machine: dict) -> str:
    keys = ("device", "cpu", "cores", "torch", "triton", "transformers", "trl", "commit", "date")
    return ", ".join(f"{k}: {machine[k]}" for k in keys if machine.get(k))


def ops_table(data: dict) -> str:
    groups = defaultdict(list)
    for bench in data["benchmarks"]:
        groups[bench["group"]].append(bench)
    lines = [
        "| op | implementation | median ms | speed-up vs baseline | largest tensor MB |",
        "|---|---|---:|---:|---:|",
    ]
    for group, rows in groups.items():
        base = next((r for r in rows if r["extra_info"].get("baseline")), None)
        for r in rows:
            median = r["stats"]["median"]
            ratio = f"{base['stats']['median'] / median:.2f}x" if base else "n/a"
            if r is base:
                ratio = "1.00x (baseline)"
            info = r["extra_info"]
            lines.append(
                f"| {group} | {info['impl']} | {median * 1e3:.3f} | {ratio} | {info.get('largest_tensor_mb', 0):.1f} |"
            )
    return "\n".join(lines)


def e2e_table(data: dict) -> str:
    lines = [
        "| framework | s / iteration | tokens / s | peak memory MB | speed-up | memory ratio | tries (s / iteration) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    rows = data["runs"]
    base = next((r for r in rows if r["framework"].startswith("trl") and "error" not in r), None)
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['framework']} | skipped: {r['error']} | | | | | |")
            continue
        speed = f"{base['seconds_per_iteration'] / r['seconds_per_iteration']:.2f}x" if base else ""
        memory = f"{r['peak_memory_mb'] / base['peak_memory_mb']:.2f}" if base else ""
        tries = ", ".join(f"{s:.2f}" for s in r.get("seconds_per_iteration_tries", []))
        lines.append(
            f"| {r['framework']} | {r['seconds_per_iteration']:.2f} | {r['tokens_per_s']:.0f} | "
            f"{r['peak_memory_mb']:.0f} | {speed} | {memory} | {tries} |"
        )
    ours = next((r for r in rows if r["framework"] == "fastppo" and "phase_seconds" in r), None)
    if ours:
        lines += ["", phase_table(ours, base)]
    return "\n".join(lines)


def phase_table(run: dict, base: dict | None = None) -> str:
    """fastppo's phases, and how close each comes to what the machine does (bench.e2e.hardware_ratios)."""
    hw, phases = run["hardware"], run["phase_seconds"]
    lines = [
        f"fastppo's iteration by phase, against a {hw['matmul_gflops']:.0f} GFLOP/s matmul of the LM head's shape "
        f"and a {hw['copy_gb_per_s']:.1f} GB/s copy (old log-probs "
        f"{'from the rollout' if run['old_logprobs_from_rollout'] else 'recomputed'}):",
        "",
        "| phase | s / iteration | share | achieved | of the machine |",
        "|---|---:|---:|---:|---:|",
    ]
    total = sum(phases.values()) or 1.0
    for phase, seconds in phases.items():
        if phase == "advantages":
            achieved = of = "(scans: negligible)"
        elif phase == "rollout":
            achieved = f"{hw['decode_gb_per_s']:.1f} GB/s of weights"
            of = f"{hw['decode_of_copy']:.0%} of the copy"
        else:
            achieved, of = f"{hw[phase + '_gflops']:.0f} GFLOP/s", f"{hw[phase + '_of_matmul']:.0%} of the matmul"
        lines.append(f"| {phase} | {seconds:.3f} | {seconds / total:.0%} | {achieved} | {of} |")
    if "floor_seconds" in hw:
        floor = hw["floor_seconds"]
        bound = f": {base['seconds_per_iteration'] / floor:.2f}x TRL's time at most" if base else ""
        lines += [
            "",
            f"At those two rates (every FLOP at the matmul's, one read of the weights per decode step at "
            f"the copy's) an iteration takes at least {floor:.2f} s on this machine in float32{bound}.",
        ]
    return "\n".join(lines)


def rollout_table(data: dict) -> str:
    """bench/rollout_engines.py: fastppo's decode loop against vLLM, tokens/s side by side, per model."""
    lines = [
        "| model | engine | rollout s | tokens / s | vs hf | engine start s | weight sync s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    hf = {r["model"]: r for r in data["rows"] if r["engine"] == "hf"}
    for r in data["rows"]:
        base = hf.get(r["model"])
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else ""
        start, sync = (f"{r[k]:.2f}" if k in r else "" for k in ("startup_s", "sync_s"))
        shape = f"{r['model']} (H {r['hidden']}, {r['layers']} layers, {r['batch']} x {r['response']} new)"
        lines.append(
            f"| {shape} | {r['engine']} | {r['rollout_s']:.2f} | {r['tokens_per_s']:.0f} | {ratio} | {start} | {sync} |"
        )
    return "\n".join(lines)


def render(ops_path: Path | None, e2e_paths: list[Path], rollout_path: Path | None = None) -> str:
    out = [BEGIN]
    if ops_path:
        data = json.loads(ops_path.read_text())
        out += [f"### Ops (`{ops_path.name}`)", "", machine_line(data.get("machine_info", {}).get("fastppo", {})), ""]
        out += [ops_table(data), ""]
    for e2e_path in e2e_paths:
        data = json.loads(e2e_path.read_text())
        out += [f"### PPO end to end, {data.get('size', 'default')} model (`{e2e_path.name}`)", ""]
        out += [machine_line(data["machine"]), "", f"Config: {data['config']}", "", e2e_table(data), ""]
    if rollout_path:
        data = json.loads(rollout_path.read_text())
        out += [f"### Rollout engines: hf decode loop against vLLM (`{rollout_path.name}`)", ""]
        out += [machine_line(data.get("machine", {})) + f", vllm: {data['vllm']}", "", rollout_table(data), ""]
    out.append(END)
    return "\n".join(out)


def update_readme(ops_path: Path | None, e2e_paths: list[Path]) -> None:
    text = README.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    rollout_path = newest("rollout-*.json")
    README.write_text(text[:start] + render(ops_path, e2e_paths, rollout_path) + text[end:])


if __name__ == "__main__":
    paths = [Path(p) for p in sys.argv[1:]]
    ops_path = next((p for p in paths if p.name.startswith("ops")), None) or newest("ops-*.json")
    e2e_paths = [p for p in paths if p.name.startswith("e2e")] or newest_e2e()
    update_readme(ops_path, e2e_paths)
    print(render(ops_path, e2e_paths, newest("rollout-*.json")))
