"""Metrics: one JSON line per step in <output_dir>/metrics.jsonl, the same scalars in TensorBoard.

Names are grouped by prefix, as CleanRL does: reward/, policy/, value/, rollout/, kl/, perf/, time/.
"""

from __future__ import annotations

import json
import os
import resource

import torch


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory, or this process's peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over valid tokens: 1 is a perfect critic, <= 0 a useless one."""
    valid = mask.bool()
    if valid.sum() < 2:
        return float("nan")
    r, v = returns[valid].double(), values[valid].double()
    var = r.var()
    return float(1 - (r - v).var() / var) if var > 0 else float("nan")


class MetricsLogger:
    def __init__(self, output_dir: str, tensorboard: bool = True, append: bool = False):
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.file = open(self.path, "a" if append else "w")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(output_dir, "tb"))
            except ImportError:  # tensorboard is a dependency, but a broken install must not stop training
                self.writer = None

    def log(self, metrics: dict) -> None:
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        if self.writer is not None:
            for name, value in metrics.items():
                if name != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(name, value, metrics["step"])
            self.writer.flush()

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines of steps after the checkpoint, which the resumed run will log again, and a last
        line torn by a kill mid-write. The file is replaced atomically, so a second crash here loses nothing."""
        self.file.close()
        kept = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # blank, or torn by a kill
                    if isinstance(record, dict) and record.get("step", 0) <= step:
                        # A record torn just before its newline still parses: end it, or the next one joins it.
                        kept.append(line if line.endswith("\n") else line + "\n")
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self.file = open(self.path, "a")

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()
