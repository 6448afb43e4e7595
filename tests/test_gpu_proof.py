"""bench/gpu_proof.py, the GPU proof in one command: its dry run end to end, how it survives a part that fails or
overruns, its test selection (`-m gpu`), its targets, and bench/report.py's rendering of it (docs/gpu.md)."""

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import gpu_proof, report

ROOT = Path(__file__).resolve().parent.parent


def test_the_dry_run_runs_every_part_at_tiny_sizes_and_claims_nothing(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "bench/gpu_proof.py", "--dry-run", "--results-dir", str(tmp_path)]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [path] = tmp_path.glob("gpu-proof-*-dry-run.json")
    data = json.loads(path.read_text())
    assert data["dry_run"] and data["machine"]["torch"] == torch.__version__
    assert {name: part["status"] for name, part in data["parts"].items()} == dict.fromkeys(gpu_proof.PARTS, "ok")
    tests = data["parts"]["tests"]  # one test of each module `-m gpu` selects, the trainer's among them
    assert tests["counts"] == {"passed": tests["selected"]} and tests["selected"] >= 10 and tests["not_run"] == 0
    groups = {(row["group"].split()[0], row.get("baseline", False)) for row in data["parts"]["ops"]["rows"]}
    kinds = ("token_logprobs", "linear_token_logprobs+entropy", "gae", "shape_rewards", "policy+value")
    assert groups == {(kind, baseline) for kind in kinds for baseline in (True, False)}
    assert data["parts"]["ops"]["copy_gb_per_s"] > 0 and not data["parts"]["ops"]["errors"]
    rows = data["parts"]["ppo"]["rows"]
    assert [row["mode"] for row in rows] == ["full fine-tuning", "LoRA rank 16"]
    for row in rows:
        assert set(row["phase_seconds"]) == {"rollout", "reward", "logprobs", "advantages", "train"}
        assert row["dominant_phase"] in row["phase_seconds"] and row["tokens_per_s"] > 0
    assert rows[1]["trainable_m"] < rows[0]["trainable_m"]  # LoRA trains a few adapters, full fine-tuning all
    assert all(t["met"] is None and t["measured"] is None for t in data["targets"])  # a dry run measures nothing
    assert report.newest_gpu_proof(tmp_path) is None  # nor is it ever the README's GPU result
    assert "a dry run" in "\n".join(report.gpu_proof_section(path))
    with pytest.raises(SystemExit, match="dry run"):
        report.update_readme(None, [], path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")
def test_without_a_gpu_only_the_dry_run_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FASTPPO_NO_JIT_BUILD", "1")  # main() sets it for its children: keep this process's as it was
    assert gpu_proof.main(["--results-dir", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err and not list(tmp_path.iterdir())
    assert gpu_proof.main(["--dry-run", "--results-dir", str(gpu_proof.RESULTS)]) == 2
    assert gpu_proof.main(["--dry-run", "--parts", "tests,benchmarks"]) == 2
    assert "unknown benchmarks" in capsys.readouterr().err


def test_a_failed_part_is_recorded_on_disk_and_the_next_part_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTPPO_NO_JIT_BUILD", "1")  # main() sets it for its children: keep this process's as it was
    seen = {}

    def benchmarks(module, part, save, *args):
        if module == "gpu_ops":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        [path] = tmp_path.glob("gpu-proof-*.json")  # the ops part's failure is on disk before ppo starts
        seen.update(json.loads(path.read_text())["parts"]["ops"])
        return "ok"

    monkeypatch.setattr(gpu_proof, "run_benchmarks", benchmarks)
    assert gpu_proof.main(["--dry-run", "--results-dir", str(tmp_path), "--parts", "ops,ppo"]) == 1
    assert seen["status"] == "error" and "illegal memory access" in seen["error"]
    [path] = tmp_path.glob("gpu-proof-*.json")
    parts = json.loads(path.read_text())["parts"]
    assert [parts[name]["status"] for name in ("environment", "ops", "ppo")] == ["ok", "error", "ok"]
    assert "tests" not in parts


def test_a_child_past_its_deadline_is_killed_and_keeps_what_it_reported(tmp_path):
    lines = tmp_path / "lines.jsonl"
    reports_then_hangs = f"from bench.gpu_proof import emit; emit({str(lines)!r}, row={{'ms': 1.0}}); import time; "
    reports_then_hangs += "time.sleep(600)"
    commands = [
        [sys.executable, "-c", reports_then_hangs],
        [sys.executable, "-c", "raise SystemExit(3)"],
        [sys.executable, "-c", "pass"],
    ]
    outputs = [tmp_path / f"{i}.log" for i in range(3)]
    began = time.monotonic()
    results = gpu_proof.run_children(commands, [dict(os.environ)] * 3, outputs, began + 5, 3, lambda: None)
    assert time.monotonic() - began < 60
    assert [r["status"] for r in results] == ["timeout", "failed", "ok"] and results[1]["returncode"] == 3
    assert gpu_proof.read_lines(lines) == [{"row": {"ms": 1.0}}]


def test_the_pytest_plugin_runs_one_shard_and_logs_each_outcome(tmp_path):
    (tmp_path / "test_four.py").write_text(
        "import pytest\n"
        "def test_a(): pass\n"
        "def test_b(): assert 1 == 2, 'one is not two'\n"
        "def test_c(): pytest.skip('no GPU here')\n"
        "@pytest.fixture\n"
        "def broken(): raise RuntimeError('setup broke')\n"
        "def test_d(broken): pass\n"
    )
    (tmp_path / "test_unimportable.py").write_text("import a_module_nobody_installed\n")
    outcomes = {}
    for shard in ("0/2", "1/2"):
        log = tmp_path / f"{shard[0]}.jsonl"
        env = dict(os.environ, FASTPPO_TEST_LOG=str(log), FASTPPO_TEST_SHARD=shard)
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "bench.pytest_log"]
        command += ["--continue-on-collection-errors", str(tmp_path)]
        subprocess.run(command, cwd=ROOT, env=env, capture_output=True)
        lines = gpu_proof.read_lines(log)
        if shard == "0/2":  # the first shard reports the module that cannot be imported, once
            assert lines[0]["nodeid"].endswith("test_unimportable.py") and lines[0]["when"] == "collect"
            assert "a_module_nobody_installed" in lines.pop(0)["message"]
        assert lines[0] == {"collected": 4, "selected": 2, "shard": shard}
        outcomes.update({line["nodeid"].split("::")[1]: line for line in lines[1:]})
    assert {name: line["outcome"] for name, line in outcomes.items()} == {
        "test_a": "passed",
        "test_b": "failed",
        "test_c": "skipped",
        "test_d": "error",
    }
    assert "one is not two" in outcomes["test_b"]["message"] and "no GPU here" in outcomes["test_c"]["message"]
    assert "setup broke" in outcomes["test_d"]["message"]


# The op test modules whose op has no Triton kernel: they never run anything on a GPU.
CPU_ONLY_OP_TESTS = {"test_decode_attention"}


def test_the_gpu_selection_holds_every_backend_test_and_the_trainer():
    """`-m gpu` (what the proof runs on CUDA) must hold every module that tests the backends, and the trainer's."""
    modules = [p.stem for p in (ROOT / "tests" / "ops").glob("test_*.py") if "backend_params" in p.read_text()]
    names = [f"tests.ops.{m}" for m in modules if m not in CPU_ONLY_OP_TESTS] + ["tests.ppo.test_trainer"]
    for name in names:
        marks = getattr(importlib.import_module(name), "pytestmark", [])
        marks = marks if isinstance(marks, list) else [marks]
        assert any(mark.name == "gpu" for mark in marks), f"{name} has no pytestmark gpu: the GPU proof skips it"
    assert len(names) >= 10


def measured(tmp_path, logprobs_ms, of_copy, linear_ms, working_of_logits) -> Path:
    """A GPU proof's JSON as a GPU run writes it, with the anchor rows at the given numbers."""
    logprobs = {"group": gpu_proof.LOGPROBS_GROUP.format(*gpu_proof.LOGPROBS_SHAPE), "impl": "fastppo[triton]"}
    logprobs.update(ms=logprobs_ms, gb_per_s=2600.0 * of_copy / 0.87, of_copy=of_copy)
    linear = {"group": gpu_proof.LINEAR_GROUP.format(*gpu_proof.LINEAR_SHAPE), "impl": "fastppo[triton] fused"}
    linear.update(ms=linear_ms, working_mb=2048 * working_of_logits, logits_mb=2048.0)
    linear["working_of_logits"] = working_of_logits
    phases = {"rollout": 3.0, "reward": 0.2, "logprobs": 0.5, "advantages": 0.01, "train": 1.5}
    ppo = {"mode": "full fine-tuning", "seconds_per_iteration": 5.3, "phase_seconds": phases, "iterations_timed": 3}
    ppo.update(dominant_phase="rollout", tokens_per_s=4600.0, first_iteration_s=30.0, peak_memory_mib=20000.0)
    data = {"kind": "gpu-proof", "dry_run": False, "machine": {"device": "NVIDIA H100 80GB HBM3", "capability": "9.0"}}
    data["parts"] = {"ops": {"status": "ok", "rows": [logprobs, linear]}, "ppo": {"status": "ok", "rows": [ppo]}}
    data.update(cited=gpu_proof.CITED, targets=[])
    data["targets"] = gpu_proof.evaluate_targets(data)
    path = tmp_path / "gpu-proof-20270101-000000.json"
    path.write_text(json.dumps(data))
    return path


def test_the_targets_are_reported_against_the_anchor_rows(tmp_path):
    met = json.loads(measured(tmp_path, 0.85, 0.9, 45.0, 0.1).read_text())["targets"]
    assert [t["met"] for t in met] == [True, True, True, True, None]
    assert met[-1]["measured"] == "5.30 s, rollout 58% of the phases"
    path = measured(tmp_path, 1.2, 0.6, 60.0, 0.2)
    assert [t["met"] for t in json.loads(path.read_text())["targets"]] == [False, False, False, False, None]
    assert report.newest_gpu_proof(tmp_path) == path
    text = "\n".join(report.gpu_proof_section(path))
    assert "NVIDIA H100" in text and "| **no** |" in text and "No GPU result" not in text
    assert text.count("| cited, not measured |") == len(gpu_proof.CITED)


def test_the_readme_says_no_gpu_result_exists_until_one_is_measured():
    readme = (ROOT / "bench" / "README.md").read_text()
    section = "\n".join(report.gpu_proof_section(report.newest_gpu_proof()))
    assert section in readme, "bench/README.md is stale: run python -m bench.report"
    if report.newest_gpu_proof() is None:
        assert "No GPU result exists yet" in readme and "| cited, not measured |" in readme
