"""Metrics: one JSON line per step in <output_dir>/metrics.jsonl, the same scalars in TensorBoard.

Names are grouped by prefix, as CleanRL does: reward/, policy/, value/, rollout/, kl/, optim/, perf/
(docs/metrics.md lists them all).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import time

import torch


class PhaseTimer:
    """Wall seconds per named phase, summed over the phase's runs (dynamic sampling repeats the rollout):

    timer = PhaseTimer()
    with timer("rollout"):
        ...
    timer.seconds  # {"rollout": 1.25}
    """

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


class Stats:
    """Statistics gathered from the parts of a step (micro-batches, minibatches, ranks), each combined as its kind
    says:

        SUM   the parts add up (a loss already divided by the whole minibatch's token count)
        MEAN  each part's value weighted by its share (of the tokens, of the updates): the shares sum to 1
        MAX   the largest part

    stats = Stats()
    stats.add("policy/clip_frac", 0.25, Stats.MEAN, weight=0.5)  # this micro-batch holds half the tokens
    stats.add("policy/ratio_max", 1.3, Stats.MAX)
    """

    SUM, MEAN, MAX = "sum", "mean", "max"

    def __init__(self, values: dict[str, float] | None = None, kind: str = SUM):
        self.totals: dict[str, float] = {}
        self.kinds: dict[str, str] = {}
        for name, value in (values or {}).items():
            self.add(name, value, kind)

    def add(self, name: str, value: float, kind: str, weight: float = 1.0) -> None:
        if self.kinds.setdefault(name, kind) != kind:
            raise ValueError(f"{name} is a {self.kinds[name]} statistic, added as a {kind} one")
        if kind == self.MAX:
            self.totals[name] = max(self.totals.get(name, -math.inf), value)
        else:
            self.totals[name] = self.totals.get(name, 0.0) + value * (weight if kind == self.MEAN else 1.0)

    def update(self, other: Stats) -> None:
        for name, value in other.totals.items():
            self.add(name, value, other.kinds[name])

    def averaged(self, count: int) -> dict[str, float]:
        """The totals of `count` parts of equal weight (the optimizer steps of a PPO step) as their mean; maxima
        stay the largest."""
        return {name: v if self.kinds[name] == self.MAX else v / count for name, v in self.totals.items()}

    def as_dict(self) -> dict[str, float]:
        return dict(self.totals)


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
    """Nothing is created or truncated before the first record: a run that stops before its first step (bad input,
    a model that fails to load) leaves output_dir exactly as it found it.

    `close()` (or leaving a `with MetricsLogger(...)` block) closes the file and TensorBoard's writer; it may be
    called any number of times, and a record logged after it reopens the file in append mode.
    """

    def __init__(self, output_dir: str, tensorboard: bool = True, append: bool = False):
        self.output_dir, self.tensorboard, self.append = output_dir, tensorboard, append
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.file = None
        self.writer = None

    def _open(self) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        self.file = open(self.path, "a" if self.append else "w")
        self.append = True  # reopened after close(): never truncate what this run already wrote
        if self.tensorboard and self.writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(self.output_dir, "tb"))
            except ImportError:  # tensorboard is a dependency, but a broken install must not stop training
                self.tensorboard = False

    def log(self, metrics: dict) -> None:
        if self.file is None:
            self._open()
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
        if self.file is not None:
            self.file.close()
            self.file = None
        self.append = True  # the next record goes after the kept ones
        if not os.path.exists(self.path):
            return
        kept = []
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

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
