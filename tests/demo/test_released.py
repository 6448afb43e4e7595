"""`fastppo demo --model`: the released-model pipeline's plumbing on a tiny instruct model (the real run is a
benchmark: docs/demo-results.md)."""

import json
import os

from transformers import AutoModelForCausalLM

from fastppo.cli import main
from fastppo.demo import released


def test_the_pipeline_trains_evaluates_and_exports(tiny_models, tmp_path):
    policy = tiny_models["qwen2"][0]  # chat template, bf16 weights, two end-of-turn ids
    summary = released.run_released(policy, str(tmp_path / "run"), released.QUICK, seed=0, algo="rloo", kl_control=True)
    assert set(summary["before"]) == set(summary["after"]) == {"accuracy", "words"}
    answers = [json.loads(line) for line in open(tmp_path / "run" / "held_out_answers.jsonl")]
    assert len(answers) == released.QUICK.held_out and {"before", "after", "answer"} <= set(answers[0])
    assert len(summary["train_correctness"]) == released.QUICK.steps
    assert type(AutoModelForCausalLM.from_pretrained(summary["final"])).__name__ == "Qwen2ForCausalLM"


def test_the_demo_command_takes_a_model(tiny_models, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--model", tiny_models["llama"][0], "--quick", "--output-dir", str(out)]) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    assert os.path.isfile(out / "final" / "config.json") and os.path.isfile(out / "summary.json")


def test_without_kl_control_the_kl_is_still_measured(tiny_models, tmp_path):
    run = str(tmp_path / "run")
    summary = released.run_released(tiny_models["llama"][0], run, released.QUICK, seed=0, algo="rloo", kl_control=False)
    assert summary["kl_control"] is False and summary["kl"] == summary["kl"]  # a number, not NaN or missing
