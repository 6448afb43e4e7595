"""Bar charts of the speed-ups in a benchmark run, as a PNG."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path


def draw(ops_path: Path | None, e2e_path: Path | None, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = defaultdict(dict)  # group -> impl -> speed-up
    if ops_path:
        groups = defaultdict(list)
        for b in json.loads(ops_path.read_text())["benchmarks"]:
            groups[b["group"]].append(b)
        for group, rows in groups.items():
            base = next((r for r in rows if r["extra_info"].get("baseline")), None)
            for r in rows:
                if base:
                    bars[group][r["extra_info"]["impl"]] = base["stats"]["median"] / r["stats"]["median"]
    if e2e_path:
        runs = [r for r in json.loads(e2e_path.read_text())["runs"] if "error" not in r]
        base = next((r for r in runs if r["framework"].startswith("trl")), None)
        for r in runs:
            if base:
                bars["PPO iteration"][r["framework"]] = base["seconds_per_iteration"] / r["seconds_per_iteration"]
    fig, axes = plt.subplots(len(bars), 1, figsize=(8, 1.4 * sum(len(v) for v in bars.values()) + 1), squeeze=False)
    for ax, (group, impls) in zip(axes[:, 0], bars.items(), strict=True):
        values = list(impls.values())
        # Bars grow from 0.1x on a log axis that always shows 0.1x to 200x: a bar's length compares across panels,
        # and a 0.98x bar does not look ten times shorter than the baseline.
        ax.barh(
            list(impls),
            [v - 0.1 for v in values],
            left=0.1,
            color=["tab:blue" if v >= 1 else "tab:red" for v in values],
        )
        for y, v in enumerate(values):
            ax.text(v * 1.05, y, f"{v:.2f}x", va="center", fontsize=8)
        ax.axvline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.set_title(group, fontsize=9)
        ax.set_xscale("log")
        ax.set_xlim(0.1, max(200.0, max(values) * 2))
    axes[-1, 0].set_xlabel("speed-up over the baseline (same run; log scale)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out
