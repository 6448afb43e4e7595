"""Where fastppo's memory goes: the peak RSS of each phase of a PPO iteration, on the e2e bench's models and batch,
against what the libraries alone hold and the tensors the trainer keeps.

Linux only. Each phase starts by resetting the process's peak RSS (writing 5 to /proc/self/clear_refs) and ends by
reading it (VmHWM), so a row is the most memory the process held during that phase. What it is made of:

- the libraries: torch, transformers and the model's modeling code (transformers imports torch._dynamo, triton,
  scipy and sympy with it), measured before any model is loaded; TRL's process carries the same, measured in a
  process of its own that imports trl's PPOTrainer beside them;
- the tensors kept between phases (weights, optimizer state), counted from their own sizes;
- training's working set: the gradients, and the activations autograd saves for the backward (the largest
  micro-batch's, counted by a saved-tensors hook);
- what glibc's malloc keeps of memory the tensors freed (free bytes in its arenas at the phase's end, mallinfo2).

    python -m bench.memory [--size default|large|varlen|quick|smollm2] [--out bench/results/memory-....json]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import multiprocessing
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MB = 1024 * 1024
FIELDS = ("VmRSS", "RssAnon", "RssFile")


def rss_mb(field: str = "VmRSS") -> float:
    """MB of the process's resident set (VmRSS), its peak since the last reset (VmHWM), or the resident set's heap
    and anonymous maps (RssAnon) and file pages (RssFile: libraries, memory-mapped checkpoints)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


class _MallInfo2(ctypes.Structure):
    names = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    _fields_ = [(name, ctypes.c_size_t) for name in names]


def malloc_free_mb() -> float | None:
    """MB that glibc's malloc holds free in its arenas (freed by the program, not returned to the system); None
    without glibc >= 2.33."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    return mallinfo2().fordblks / MB


def tensor_mb(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None) / MB


def held_tensors(trainer) -> dict[str, float]:
    """MB of what the trainer keeps between phases, by owner."""
    params = list(trainer.model.parameters())
    held = {
        "policy + value head weights": tensor_mb(params),
        "optimizer state": tensor_mb(
            v for state in trainer.optimizer.state.values() for v in state.values() if hasattr(v, "numel")
        ),
    }
    if trainer.reference is not None:
        held["reference weights"] = tensor_mb(trainer.reference.parameters())
    models = [getattr(r, "model", None) for r in trainer.reward.rewards]
    held["reward model weights"] = tensor_mb(p for m in models if m is not None for p in m.parameters())
    return held


def import_model_code(policy_dir: Path) -> None:
    """Import the modeling code of the checkpoint's architecture (what `from_pretrained` would import)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(policy_dir))]


def trl_libraries(policy_dir: Path, queue) -> None:
    """In a process of its own: the RSS of TRL's imports (those of the e2e bench's TRL run) and the model's code."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification  # noqa: F401
    from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: F401

    import_model_code(policy_dir)
    queue.put({field: rss_mb(field) for field in FIELDS})


def saved_activations(trainer, sizes: list[float]):
    """Wrap the trainer's training forward so that each micro-batch appends the MB autograd saved for its backward
    (each storage once, the parameters left out)."""
    import torch

    forward = trainer.parallel.train_model
    parameters = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}

    def counted(*args, **kwargs):
        saved: dict[int, int] = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in parameters:
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = forward(*args, **kwargs)
        sizes.append(sum(saved.values()) / MB)
        return out

    trainer.parallel.train_model = counted


def profile(size: str) -> dict:
    import torch  # noqa: F401  (the libraries' RSS is part of the floor)
    import transformers  # noqa: F401

    import fastppo  # noqa: F401
    from bench.e2e import SIZES, build_models, fastppo_trainer
    from fastppo.runtime import metrics

    cfg = SIZES[size]
    peaks: dict[str, float] = {}
    free_at_end: dict[str, float | None] = {}
    activations: list[float] = []
    phase_timer = metrics.PhaseTimer.__call__

    @contextlib.contextmanager
    def measured(timer, phase: str):
        reset_peak()
        with phase_timer(timer, phase):
            yield
        peaks[phase] = max(peaks.get(phase, 0.0), rss_mb("VmHWM"))
        free_at_end[phase] = malloc_free_mb()

    spawn = multiprocessing.get_context("spawn")
    metrics.PhaseTimer.__call__ = measured
    try:
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp)
            # built in another process, as the e2e bench does: building would leave its own heap and pages in this one
            builder = spawn.Process(target=build_models, args=(cfg, directory))
            builder.start()
            builder.join()
            if (directory / "cfg.json").is_file():
                cfg = cfg | json.loads((directory / "cfg.json").read_text())
            import_model_code(directory / "policy")
            libraries_mb = {field: rss_mb(field) for field in FIELDS}
            trl_libraries_mb = None
            with contextlib.suppress(ImportError):
                import trl  # noqa: F401  (only whether it is installed: its imports are measured in their process)

                queue = spawn.Queue()
                child = spawn.Process(target=trl_libraries, args=(directory / "policy", queue))
                child.start()
                trl_libraries_mb = queue.get(timeout=600)
                child.join()
            trainer = fastppo_trainer(cfg, directory)
            loaded_mb = {field: rss_mb(field) for field in FIELDS}
            saved_activations(trainer, activations)
            trainer.train()
            held = held_tensors(trainer)
            gradients = tensor_mb(p for p in trainer.model.parameters() if p.requires_grad)
    finally:
        metrics.PhaseTimer.__call__ = phase_timer
    return {
        "size": size,
        "libraries_mb": libraries_mb,
        "trl_libraries_mb": trl_libraries_mb,
        "after_loading_mb": loaded_mb,
        "held_mb": held,
        "training_mb": {"gradients": gradients, "saved activations (largest micro-batch)": max(activations)},
        "phase_peak_mb": peaks,
        "malloc_free_at_phase_end_mb": free_at_end,
        "peak_mb": max(peaks.values()),
    }


def table(data: dict) -> str:
    held = sum(data["held_mb"].values())
    libraries, loaded, trl = data["libraries_mb"], data["after_loading_mb"], data["trl_libraries_mb"]
    trl_line = f"; TRL's process with trl imported: {trl['VmRSS']:.0f} MB" if trl else ""
    lines = [
        f"Libraries (torch, transformers, the model's code, fastppo): {libraries['VmRSS']:.0f} MB "
        f"({libraries['RssFile']:.0f} of it file pages){trl_line}. After loading the models: {loaded['VmRSS']:.0f} "
        f"MB ({loaded['RssFile']:.0f} file pages). Kept between phases, and training's working set:",
        "",
        "| tensors | MB |",
        "|---|---:|",
        *(f"| {name} | {mb:.0f} |" for name, mb in data["held_mb"].items()),
        *(f"| training: {name} | {mb:.0f} |" for name, mb in data["training_mb"].items()),
        "",
        "| phase | peak RSS MB | above the libraries and kept tensors | freed, kept by malloc at its end |",
        "|---|---:|---:|---:|",
    ]
    for phase, mb in data["phase_peak_mb"].items():
        free = data["malloc_free_at_phase_end_mb"].get(phase)
        kept = "" if free is None else f"{free:.0f}"
        lines.append(f"| {phase} | {mb:.0f} | {mb - libraries['VmRSS'] - held:.0f} | {kept} |")
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
