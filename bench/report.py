"""Turn benchmark JSON from `bench/results/` into the Markdown tables of `bench/README.md` (never typed by hand).

    python -m bench.report [ops.json] [e2e.json ...] [gpu-proof.json]   # default: the newest of each kind

The README keeps its prose; only the text between `<!-- results:begin -->` and `<!-- results:end -->` is replaced.
Its first section is bench/gpu_proof.py's newest result, or the statement that no GPU result exists yet (a dry
run's JSON is never one).
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
    return [p for p in (newest(f"e2e-{size}-*.json") for size in ("default", "large", "varlen", "smollm2")) if p]


def newest_memory() -> list[Path]:
    """The newest memory profile of each size (memory-<size>-<stamp>.json) that accounts for the libraries."""
    paths = (newest(f"memory-{size}-*.json") for size in ("default", "smollm2"))
    return [p for p in paths if p and "libraries_mb" in json.loads(p.read_text())]


def newest_gpu_proof(directory: Path = RESULTS) -> Path | None:
    """The newest GPU proof measured on a GPU: a dry run's file is never one, whatever its name."""
    for path in sorted(directory.glob("gpu-proof-*.json"), reverse=True):
        if not json.loads(path.read_text()).get("dry_run", True):
            return path
    return None


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
        auto = r["framework"] == "fastppo" and "precision" in r  # what precision auto resolved to
        name = r["framework"] + (f" (auto: {r['precision']})" if auto else "")
        lines.append(
            f"| {name} | {r['seconds_per_iteration']:.2f} | {r['tokens_per_s']:.0f} | "
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
        "| phase | s / iteration | share | achieved | of the machine | real / computed tokens |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    real = run.get("real_token_fraction", {})  # absent from results measured before padding was trimmed
    total = sum(phases.values()) or 1.0
    for phase, seconds in phases.items():
        if phase == "advantages":
            achieved = of = "(scans: negligible)"
        elif phase == "rollout":
            achieved = f"{hw['decode_gb_per_s']:.1f} GB/s of weights"
            of = f"{hw['decode_of_copy']:.0%} of the copy"
        else:
            achieved, of = f"{hw[phase + '_gflops']:.0f} GFLOP/s", f"{hw[phase + '_of_matmul']:.0%} of the matmul"
        fraction = f"{real[phase]:.0%}" if phase in real else ""
        lines.append(f"| {phase} | {seconds:.3f} | {seconds / total:.0%} | {achieved} | {of} | {fraction} |")
    if "floor_seconds" in hw:
        floor = hw["floor_seconds"]
        bound = f": {base['seconds_per_iteration'] / floor:.2f}x TRL's time at most" if base else ""
        lines += [
            "",
            f"At those two rates (every FLOP at the matmul's, one read of the weights per decode step at "
            f"the copy's) an iteration takes at least {floor:.2f} s on this machine in float32{bound}"
            + (" (this run computed in bf16)." if run.get("precision") == "bf16" else "."),
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


def cited_table(cited: list[dict]) -> str:
    lines = ["| peers' figure | value | source | |", "|---|---:|---|---|"]
    lines += [f"| {c['what']} | {c['value']} | {c['source']} | {c['label']} |" for c in cited]
    return "\n".join(lines)


def number(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def gpu_ops_table(rows: list[dict]) -> str:
    lines = [
        "| op | implementation | median ms | speed-up vs baseline | GB/s | of the copy | peak extra MiB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    baselines = {r["group"]: r for r in rows if r.get("baseline")}
    for r in rows:
        base = baselines.get(r["group"])
        ratio = "1.00x (baseline)" if r is base else f"{base['ms'] / r['ms']:.2f}x" if base else ""
        of_copy = number(r.get("of_copy"), ".0%")
        lines.append(
            f"| {r['group']} | {r['impl']} | {r['ms']:.3f} | {ratio} | {number(r.get('gb_per_s'), '.0f')} | "
            f"{of_copy} | {number(r.get('peak_extra_mib'), '.0f')} |"
        )
    return "\n".join(lines)


def gpu_ppo_table(rows: list[dict]) -> str:
    lines = [
        "| mode | s / iteration | tokens / s | peak MiB | first iteration s | dominant phase | phases (s) |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        phases = ", ".join(f"{k} {v:.2f}" for k, v in r["phase_seconds"].items())
        lines.append(
            f"| {r['mode']} ({r['iterations_timed']} timed) | {r['seconds_per_iteration']:.2f} | "
            f"{r['tokens_per_s']:.0f} | {number(r.get('peak_memory_mib'), '.0f')} | {r['first_iteration_s']:.2f} | "
            f"{r['dominant_phase']} | {phases} |"
        )
    return "\n".join(lines)


def gpu_proof_section(path: Path | None) -> list[str]:
    """bench/gpu_proof.py's result: the parts' outcomes, the tests, the ops, the targets, the PPO iterations."""
    from bench.gpu_proof import CITED

    out = ["### GPU proof (`python bench/gpu_proof.py`, docs/gpu.md)", ""]
    if path is None:
        out += ["No GPU result exists yet: the proof has not been run on a GPU, and nothing here is a GPU", ""]
        out[-2] += " measurement. The peers' figures it will be set against:"
        return out + [cited_table(CITED), ""]
    data = json.loads(path.read_text())
    parts, machine = data["parts"], data["machine"]
    if data.get("dry_run"):
        out[0] += ": a dry run, tiny sizes, its times mean nothing"
    keys = ("capability", "cuda", "gpu_memory_gib")
    line = ", ".join([machine_line(machine)] + [f"{k}: {machine[k]}" for k in keys if machine.get(k)])
    out += [f"`{path.name}`: {line}", ""]
    out += ["Parts: " + ", ".join(f"{name} {p['status']} ({p.get('seconds', '?')} s)" for name, p in parts.items())]
    differences = machine.get("recorded_machine", {}).get("differences")
    if differences:
        out += ["", "This machine against the one recorded: " + "; ".join(differences) + "."]
    tests = parts.get("tests", {})
    if "counts" in tests:
        counts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(tests["counts"].items()))
        out += ["", f"Tests (`pytest -m gpu`): {counts}; {tests.get('not_run', '?')} not run."]
        out += [f"- FAILED `{f['nodeid']}`" for f in tests.get("failures", [])[:10]]
    if parts.get("ops", {}).get("rows"):
        copy = parts["ops"].get("copy_gb_per_s")
        out += ["", f"Ops (device-to-device copy: {number(copy, '.0f')} GB/s, read + written):", ""]
        out += [gpu_ops_table(parts["ops"]["rows"])]
    out += ["", "Targets (reported against, not asserted):", "", "| target | measured | met |", "|---|---|---|"]
    for t in data["targets"]:
        met = "n/a" if t["met"] is None else "yes" if t["met"] else "**no**"
        out.append(f"| {t['target']} | {t['measured'] or t.get('note', 'not measured')} | {met} |")
    if parts.get("ppo", {}).get("rows"):
        out += ["", "PPO iterations of a Qwen2-0.5B-shaped random model (hf engine, bf16 autocast, shared critic):", ""]
        out += [gpu_ppo_table(parts["ppo"]["rows"])]
    return out + ["", cited_table(data["cited"]), ""]


def render(
    ops_path: Path | None,
    e2e_paths: list[Path],
    rollout_path: Path | None = None,
    gpu_path: Path | None = None,
    memory_paths: list[Path] = (),
) -> str:
    from bench.memory import table as memory_table

    out = [BEGIN, *gpu_proof_section(gpu_path)]
    if ops_path:
        data = json.loads(ops_path.read_text())
        out += [f"### Ops (`{ops_path.name}`)", "", machine_line(data.get("machine_info", {}).get("fastppo", {})), ""]
        out += [ops_table(data), ""]
    for e2e_path in e2e_paths:
        data = json.loads(e2e_path.read_text())
        out += [f"### PPO end to end, {data.get('size', 'default')} model (`{e2e_path.name}`)", ""]
        out += [machine_line(data["machine"]), "", f"Config: {data['config']}", "", e2e_table(data), ""]
    for memory_path in memory_paths:
        data = json.loads(memory_path.read_text())
        out += [f"### Where the memory goes, {data['size']} model (`{memory_path.name}`)", ""]
        out += [machine_line(data["machine"]), "", memory_table(data), ""]
    if rollout_path:
        data = json.loads(rollout_path.read_text())
        out += [f"### Rollout engines: hf decode loop against vLLM (`{rollout_path.name}`)", ""]
        out += [machine_line(data.get("machine", {})) + f", vllm: {data['vllm']}", "", rollout_table(data), ""]
    out.append(END)
    return "\n".join(out)


def update_readme(ops_path: Path | None, e2e_paths: list[Path], gpu_path: Path | None = None) -> None:
    text = README.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    rollout_path = newest("rollout-*.json")
    gpu_path = gpu_path or newest_gpu_proof()
    if gpu_path and json.loads(gpu_path.read_text()).get("dry_run", True):
        raise SystemExit(f"{gpu_path}: a dry run (its times mean nothing) never goes into {README.name}")
    rendered = render(ops_path, e2e_paths, rollout_path, gpu_path, newest_memory())
    README.write_text(text[:start] + rendered + text[end:])


if __name__ == "__main__":
    paths = [Path(p) for p in sys.argv[1:]]
    ops_path = next((p for p in paths if p.name.startswith("ops")), None) or newest("ops-*.json")
    e2e_paths = [p for p in paths if p.name.startswith("e2e")] or newest_e2e()
    gpu_path = next((p for p in paths if p.name.startswith("gpu-proof")), None) or newest_gpu_proof()
    update_readme(ops_path, e2e_paths, gpu_path)
    print(render(ops_path, e2e_paths, newest("rollout-*.json"), gpu_path, newest_memory()))
