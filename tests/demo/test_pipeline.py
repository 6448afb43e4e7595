"""`fastppo demo --quick` end to end: SFT, reward model, PPO, gold evaluation, and the files a user is promised."""

from __future__ import annotations

import argparse
import json
import math
import os

import pytest
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from fastppo.cli import main
from fastppo.demo import pipeline


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    output_dir = str(tmp_path_factory.mktemp("demo") / "run")
    assert main(["demo", "--quick", "--output-dir", output_dir, "--seed", "0"]) == 0
    with open(os.path.join(output_dir, "summary.json")) as f:
        return output_dir, json.load(f)


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
def test_ppo_raises_gold_reward_over_the_sft_policy(quick_run):
    _, summary = quick_run
    sft, ppo = summary["eval"][0], summary["eval"][-1]
    assert ppo["step"] == pipeline.QUICK.ppo_steps
    assert ppo["gold"] - sft["gold"] > 0.5, f"gold {sft['gold']:+.2f} -> {ppo['gold']:+.2f}"
    assert ppo["proxy"] > sft["proxy"]
    assert summary["reward_model"]["eval_accuracy"] > 0.7


@pytest.mark.slow
def test_kl_is_finite_and_near_its_target(quick_run):
    output_dir, summary = quick_run
    target = pipeline.QUICK.adaptive_kl_target
    rows = read_jsonl(os.path.join(output_dir, "ppo", "metrics.jsonl"))
    assert len(rows) >= pipeline.QUICK.ppo_steps
    assert all(math.isfinite(r["policy/kl"]) for r in rows)
    final_kl = summary["eval"][-1]["kl"]
    assert target / 4 < final_kl < target * 2, f"KL {final_kl:.2f} nats, target {target}"


@pytest.mark.slow
def test_run_directory_has_checkpoints_plot_and_report(quick_run):
    output_dir, summary = quick_run
    AutoModelForCausalLM.from_pretrained(os.path.join(output_dir, "sft"))
    AutoModelForSequenceClassification.from_pretrained(os.path.join(output_dir, "reward_model"))
    ppo_files = [name for _, _, names in os.walk(os.path.join(output_dir, "ppo")) for name in names]
    assert any(name.endswith(".safetensors") for name in ppo_files), ppo_files

    eval_rows = read_jsonl(os.path.join(output_dir, "eval.jsonl"))
    assert [r["step"] for r in eval_rows] == [r["step"] for r in summary["eval"]]
    assert set(eval_rows[0]) >= {"step", "gold", "proxy", "kl", "length"}
    with open(os.path.join(output_dir, "curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(output_dir, "report.md")) as f:
        report = f.read()
    assert "| SFT (before PPO) |" in report and "| PPO, step" in report and "(curves.png)" in report
    assert summary["samples"] and all(s["prompt"] in report for s in summary["samples"])


def test_no_kl_control_flag_turns_the_penalty_off(tmp_path):
    for stage in ("sft", "reward_model"):  # the config checks that the earlier stages' directories exist
        (tmp_path / stage).mkdir()
    with_kl = pipeline.ppo_config(str(tmp_path), pipeline.QUICK, kl_control=True, seed=0)
    without = pipeline.ppo_config(str(tmp_path), pipeline.QUICK, kl_control=False, seed=0)
    assert with_kl.kl_coef > 0 and with_kl.adaptive_kl_target == pipeline.QUICK.adaptive_kl_target
    assert without.kl_coef == 0 and without.adaptive_kl_target is None


def test_train_without_config_runs_the_demo_with_its_defaults(monkeypatch, tmp_path):
    """`fastppo train` (the README's main job) reaches the demo with the demo's own defaults."""
    calls = []
    monkeypatch.setattr(pipeline, "run_pipeline", lambda *args, **kwargs: calls.append((args, kwargs)) or {})
    monkeypatch.setattr(pipeline.report, "summary_text", lambda summary: "")
    assert main(["train", "--output-dir", str(tmp_path)]) == 0
    assert main(["train", "--quick", "--no-kl-control", "--seed", "3", "--output-dir", str(tmp_path)]) == 0
    (args, kwargs), (quick_args, quick_kwargs) = calls
    assert args[1] is pipeline.FULL and kwargs == {"kl_control": True, "seed": 0, "algo": "gae"}
    assert quick_args[1] is pipeline.QUICK and quick_kwargs == {"kl_control": False, "seed": 3, "algo": "gae"}


@pytest.mark.parametrize("algo", list(pipeline.ALGORITHMS))
def test_every_algorithm_is_a_valid_run_of_the_same_budget(tmp_path, algo):
    """`fastppo demo --algo X`: a valid config whose generated-token budget is the default algorithm's."""
    for stage in ("sft", "reward_model"):
        (tmp_path / stage).mkdir()
    for settings in (pipeline.FULL, pipeline.QUICK):
        config = pipeline.ppo_config(str(tmp_path), settings, True, 0, algo)
        baseline = pipeline.ppo_config(str(tmp_path), settings, True, 0, "gae")
        budget = ("steps", "rollout_batch_size", "max_new_tokens", "adaptive_kl_target", "seed")
        assert [getattr(config, k) for k in budget] == [getattr(baseline, k) for k in budget]
        assert (config.advantage_estimator == "gae") == (algo in ("gae", "vapo"))
    parser = argparse.ArgumentParser()
    pipeline.add_arguments(parser)
    assert parser.parse_args(["--algo", algo]).algo == algo


@pytest.mark.parametrize("command", ["demo", "compare"])
def test_an_existing_run_directory_is_refused_before_anything_is_retrained(quick_run, capsys, command):
    output_dir, _ = quick_run
    before = {p: os.stat(os.path.join(output_dir, p)).st_mtime_ns for p in os.listdir(output_dir)}
    assert main([command, "--quick", "--output-dir", output_dir, "--seed", "3"]) == 2
    assert "--output-dir" in capsys.readouterr().err
    assert {p: os.stat(os.path.join(output_dir, p)).st_mtime_ns for p in os.listdir(output_dir)} == before
