"""Metrics: one JSON line per step in <output_dir>/metrics.jsonl, the same scalars in the `report_to` backends.

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
    """metrics.jsonl (one JSON line per step), completions.jsonl (`log_completions`: one line per prompt and
    completion) and the `report_to` backends (`fastppo.runtime.reporting`), which get the same scalars and tables.

    Nothing is created or truncated before the first record: a run that stops before its first step (bad input,
    a model that fails to load) leaves output_dir exactly as it found it.

    `close()` (or leaving a `with MetricsLogger(...)` block) closes the files and the backends; it may be called any
    number of times, and a record logged after it reopens the files in append mode (and the backends anew).
    """

    FILES = ("metrics.jsonl", "completions.jsonl")

    def __init__(
        self,
        output_dir: str,
        report_to=("tensorboard",),
        append: bool = False,
        run_name: str | None = None,
        settings: dict | None = None,
    ):
        self.output_dir, self.report_to, self.run_name, self.settings = output_dir, list(report_to), run_name, settings
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.fresh = not append  # a new run: its first record replaces a previous run's files (overwrite_output_dir)
        self.files: dict = {}
        self.backends = None

    def _file(self, name: str):
        if self.fresh:
            for old in self.FILES:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self.output_dir, old))
            self.fresh = False  # reopened after close(): never truncate what this run already wrote
        if name not in self.files:
            os.makedirs(self.output_dir, exist_ok=True)
            self.files[name] = open(os.path.join(self.output_dir, name), "a")
        if self.backends is None:
            from fastppo.runtime.reporting import open_backends

            self.backends = open_backends(self.report_to, self.output_dir, self.run_name, self.settings)
        return self.files[name]

    def log(self, metrics: dict) -> None:
        file = self._file("metrics.jsonl")
        file.write(json.dumps(metrics) + "\n")
        file.flush()
        scalars = {k: v for k, v in metrics.items() if k != "step" and isinstance(v, (int, float))}
        for backend in self.backends:
            backend.log(scalars, metrics["step"])

    def log_completions(self, rows: list[dict], step: int, split: str) -> None:
        """One line per row of completions.jsonl ({"step", "split", ...the row}), and a table for each backend."""
        if not rows:
            return
        rows = [{"step": step, "split": split, **row} for row in rows]
        file = self._file("completions.jsonl")
        file.writelines(json.dumps(row) + "\n" for row in rows)
        file.flush()
        for backend in self.backends:
            backend.completions(rows, step, split)

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines of steps after the checkpoint, which the resumed run will log again, and a last
        line torn by a kill mid-write, from metrics.jsonl and completions.jsonl. Each file is replaced atomically,
        so a second crash here loses nothing."""
        self._close_files()
        self.fresh = False  # the next record goes after the kept ones
        for name in self.FILES:
            _keep_steps_up_to(os.path.join(self.output_dir, name), step)

    def _close_files(self) -> None:
        for file in self.files.values():
            file.close()
        self.files = {}

    def close(self) -> None:
        self._close_files()
        for backend in self.backends or []:
            backend.close()
        self.backends = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _keep_steps_up_to(path: str, step: int) -> None:
    """Rewrite the JSONL file `path` (if any) with its records of steps <= `step` only."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # blank, or torn by a kill
            if isinstance(record, dict) and record.get("step", 0) <= step:
                # A record torn just before its newline still parses: end it, or the next one joins it.
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
