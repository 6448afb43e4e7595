"""The example scripts of examples/, in TRL's shape, run as a user runs them with --tiny: tiny models built offline
(HF_HUB_OFFLINE: nothing may be downloaded), a few steps, the metrics written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "script, metrics",
    [
        ("grpo_arithmetic.py", ["rewards/exact_match/mean", "rewards/format_reward/mean"]),
        ("ppo_reward_model.py", ["rewards/tiny-reward-model/mean", "value/loss"]),
    ],
)
def test_example_runs_with_tiny_models(script, metrics, tmp_path):
    pytest.importorskip("datasets")  # the examples build TRL's datasets.Dataset
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(ROOT / "examples" / script), "--tiny", "--output-dir", str(tmp_path / "run")]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    assert all(name in lines[-1] for name in metrics), sorted(lines[-1])
