"""The benchmark harness runs end to end at tiny sizes (no timing is checked: numbers here mean nothing)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.report import render

ROOT = Path(__file__).resolve().parent.parent


def test_op_benchmarks_run_and_report(tmp_path):
    out = tmp_path / "ops-quick.json"
    env = {**os.environ, "FASTPPO_BENCH_QUICK": "1"}
    command = [
        sys.executable,
        "-m",
        "pytest",
        "bench/bench_ops.py",
        "-q",
        "-p",
        "no:warnings",
        "-p",
        "no:cacheprovider",
        f"--benchmark-json={out}",
    ]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(out.read_text())
    groups = {b["group"].split()[0] for b in data["benchmarks"]}
    assert {"token_logprobs", "gae", "shape_rewards", "policy+value", "linear_token_logprobs"} <= groups
    table = render(out, [])
    assert "1.00x (baseline)" in table and "fastppo[torch]" in table


@pytest.mark.slow
def test_e2e_harness_runs(tmp_path):
    from bench import e2e

    path = tmp_path / "e2e-quick.json"
    data = e2e.main(path, "quick")
    fastppo = next(r for r in data["runs"] if r["framework"] == "fastppo")
    assert "error" not in fastppo, fastppo
    assert fastppo["seconds_per_iteration"] > 0 and fastppo["peak_memory_mb"] > 0
    assert set(fastppo["phase_seconds"]) == {"rollout", "reward", "logprobs", "advantages", "train"}
    assert "of the matmul" in render(None, [path])


@pytest.mark.slow
def test_memory_profile_and_forward_cost_run():
    from bench import forward_cost, memory

    data = memory.profile("quick")
    assert set(data["phase_peak_mb"]) == {"rollout", "reward", "logprobs", "advantages", "train"}
    assert data["after_loading_mb"]["VmRSS"] > data["libraries_mb"]["VmRSS"] > 0
    assert data["training_mb"]["gradients"] > 0 and data["training_mb"]["saved activations (largest micro-batch)"] > 0
    # each phase's peak is counted from its own start: a little freed between loading and the first phase is not in it
    assert data["peak_mb"] > 0.95 * data["after_loading_mb"]["VmRSS"]
    assert data["held_mb"]["policy + value head weights"] > 0 and "| rollout |" in memory.table(data)
    cost = forward_cost.main("quick")
    assert all(math.isfinite(cost[mode]["overhead_tokens"]) for mode in ("forward", "forward + backward"))
