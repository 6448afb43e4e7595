"""Where fastppo's memory goes: the peak RSS of each phase of a PPO iteration, on the e2e bench's models and batch.

Linux only. Each phase starts by resetting the process's peak RSS (writing 5 to /proc/self/clear_refs) and ends by
reading it (VmHWM), so a row is the most memory the process held during that phase; the tensors the trainer keeps
between phases (weights, gradients, optimizer state) are counted from their own sizes. What is left of a phase's
peak beyond them and the imports' RSS is that phase's own working memory: activations, logits, KV cache, the
decode's prepared weight copies.

    python -m bench.memory [--size default|large|varlen|quick] [--out bench/results/memory-....json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MB = 1024 * 1024


def rss_mb(field: str = "VmRSS") -> float:
    """MB of the process's resident set (VmRSS), its peak since the last reset (VmHWM), or the resident set's heap
    and anonymous maps (RssAnon) and file pages (RssFile: libraries, memory-mapped checkpoints)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def tensor_mb(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None) / MB


def held_tensors(trainer) -> dict[str, float]:
    """MB of what the trainer keeps between phases, by owner."""
    params = list(trainer.model.parameters())
    held = {
        "policy + value head weights": tensor_mb(params),
        "gradients": tensor_mb(p.grad for p in params),
        "optimizer state": tensor_mb(
            v for state in trainer.optimizer.state.values() for v in state.values() if hasattr(v, "numel")
        ),
    }
    if trainer.reference is not None:
        held["reference weights"] = tensor_mb(trainer.reference.parameters())
    models = [getattr(r, "model", None) for r in trainer.reward.rewards]
    held["reward model weights"] = tensor_mb(p for m in models if m is not None for p in m.parameters())
    return held


def profile(size: str) -> dict:
    import torch  # noqa: F401  (the imports' RSS is part of the baseline)
    import transformers  # noqa: F401

    import fastppo  # noqa: F401
    from bench.e2e import SIZES, build_models, fastppo_trainer
    from fastppo.runtime import metrics

    imports_mb = {field: rss_mb(field) for field in ("VmRSS", "RssAnon", "RssFile")}
    cfg = SIZES[size]
    peaks: dict[str, float] = {}
    phase_timer = metrics.PhaseTimer.__call__

    @contextlib.contextmanager
    def measured(timer, phase: str):
        reset_peak()
        with phase_timer(timer, phase):
            yield
        peaks[phase] = max(peaks.get(phase, 0.0), rss_mb("VmHWM"))

    metrics.PhaseTimer.__call__ = measured
    try:
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp)
            # built in another process, as the e2e bench does: building would leave its own heap and pages in this one
            builder = multiprocessing.get_context("spawn").Process(target=build_models, args=(cfg, directory))
            builder.start()
            builder.join()
            if (directory / "cfg.json").is_file():
                cfg = cfg | json.loads((directory / "cfg.json").read_text())
            trainer = fastppo_trainer(cfg, directory)
            loaded_mb = {field: rss_mb(field) for field in ("VmRSS", "RssAnon", "RssFile")}
            trainer.train()
            held = held_tensors(trainer)
    finally:
        metrics.PhaseTimer.__call__ = phase_timer
    return {
        "size": size,
        "imports_mb": imports_mb,
        "after_loading_mb": loaded_mb,
        "held_mb": held,
        "phase_peak_mb": peaks,
        "peak_mb": max(peaks.values()),
    }


def table(data: dict) -> str:
    held = sum(data["held_mb"].values())
    imports, loaded = data["imports_mb"], data["after_loading_mb"]
    lines = [
        f"Imports (torch, transformers, fastppo): {imports['VmRSS']:.0f} MB ({imports['RssFile']:.0f} of it file "
        f"pages); after loading the models: {loaded['VmRSS']:.0f} MB ({loaded['RssFile']:.0f} file pages). "
        "Held between phases after an iteration:",
        "",
        "| tensor | MB |",
        "|---|---:|",
        *(f"| {name} | {mb:.0f} |" for name, mb in data["held_mb"].items()),
        "",
        "| phase | peak RSS MB | beyond the imports and held tensors |",
        "|---|---:|---:|",
        *(
            f"| {phase} | {mb:.0f} | {mb - imports['VmRSS'] - held:.0f} |"
            for phase, mb in data["phase_peak_mb"].items()
        ),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="default")
    parser.add_argument("--out")
    args = parser.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    data = profile(args.size)
    from bench.machine import machine_info

    data["machine"] = machine_info()
    out = Path(args.out or ROOT / "bench" / "results" / f"memory-{args.size}-{stamp}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2))
    print(table(data))
