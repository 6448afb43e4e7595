"""`fastppo train --config ...` as a user runs it: a subprocess, exit codes, messages."""

import json

import yaml

from tests.tiny_models import run_cli


def test_train_from_yaml(tiny_models, tmp_path):
    policy, reward = tiny_models["qwen2"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"w{i} w{i + 1}"}) for i in range(8)) + "\n")
    config = {
        "policy_model": policy,
        "reward_model": reward,
        "prompts": str(prompts),
        "output_dir": str(tmp_path / "run"),
        "steps": 3,
        "rollout_batch_size": 4,
        "mini_batch_size": 2,
        "max_new_tokens": 4,
        "tensorboard": False,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = run_cli("train", "--config", str(path), "--set", "steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: 2 steps" in proc.stdout
    assert len(open(tmp_path / "run" / "metrics.jsonl").readlines()) == 2
    proc = run_cli("train", "--config", str(path), "--set", "steps=3", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "done: 3 steps" in proc.stdout


def test_bad_config_exits_2_naming_the_field(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("steps: -1\noutput_dir: " + str(tmp_path / "out") + "\n")
    proc = run_cli("train", "--config", str(path))
    assert proc.returncode == 2
    assert "steps must be > 0" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written
    path.write_text("prompts: /nope.jsonl\n")
    proc = run_cli("train", "--config", str(path))
    assert proc.returncode == 2 and "prompts: path /nope.jsonl does not exist" in proc.stderr


def test_malformed_prompts_exit_2_naming_the_line(tiny_models, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "w1"}\n{"prompt": oops}\n')
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "policy_model": tiny_models["llama"][0],
                "reward_model": "math:fsum",
                "prompts": str(prompts),
                "output_dir": str(tmp_path / "run"),
            }
        )
    )
    proc = run_cli("train", "--config", str(path))
    assert proc.returncode == 2
    assert f"{prompts}:2: not valid JSON" in proc.stderr


def test_the_stop_message_resumes_with_the_same_overrides():
    """Ctrl-C prints a command that continues this run: without the --set overrides it would resume the YAML's
    output_dir, another run."""
    import argparse

    from fastppo.cli.train import resume_command

    args = argparse.Namespace(config="my run.yaml", set=["output_dir=runs/a b", "steps=500"], nproc=None)
    assert (
        resume_command(args)
        == "fastppo train --config 'my run.yaml' '--set=output_dir=runs/a b' --set=steps=500 --resume"
    )
    args.nproc = 2
    assert resume_command(args).endswith("--set=steps=500 --nproc 2 --resume")
