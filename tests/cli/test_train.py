"""`fastppo train --config ...` as a user runs it: a subprocess, exit codes, messages."""

import json

import yaml

from tests.tiny_models import run_cli, tiny_run_yaml


def test_train_from_yaml(tiny_models, tmp_path):
    policy, reward = tiny_models["qwen2"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"w{i} w{i + 1}"}) for i in range(8)) + "\n")
    sizes = {"steps": 3, "rollout_batch_size": 4, "max_new_tokens": 4}
    path = tiny_run_yaml(tmp_path, policy, reward_model=reward, prompts=str(prompts), **sizes)
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


TRL_REWARDS = """
def accuracy(completions, answer, **kwargs):
    return [float(answer_ in c.split()) for c, answer_ in zip(completions, answer)]


def format_reward(prompts, responses):
    return [0.1 * len(r.split()) for r in responses]


def needs_a_missing_column(completions, solution, **kwargs):
    return [0.0] * len(completions)
"""


def test_trl_style_reward_funcs_from_yaml(tiny_llama, tmp_path, capsys):
    """reward_funcs from the YAML, found beside it (run from another directory), fed the JSONL's `answer` column;
    a function whose column the prompts lack, and TRL's key names, are refused before anything loads or is
    written."""
    from tests.refusal import assert_refused, run, write_yaml

    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "trl_rewards_beside.py").write_text(TRL_REWARDS)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"w{i} w{i + 1}", "answer": f"w{i + 2}"}) + "\n" for i in range(4))
    )
    config = {
        "policy_model": tiny_llama[0],
        "reward_funcs": ["trl_rewards_beside:accuracy", "trl_rewards_beside:format_reward"],
        "reward_weights": [1.0, 0.5],
        "prompts": str(prompts),
        "output_dir": str(tmp_path / "run"),
        "steps": 1,
        "rollout_batch_size": 2,
        "mini_batch_size": 2,
        "max_new_tokens": 4,
        "tensorboard": False,
    }
    code, out, err = run(["train", "--config", write_yaml(tmp_path / "conf" / "run.yaml", config)], capsys)
    assert code == 0, err[-2000:]
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert {"rewards/accuracy/mean", "rewards/format_reward/mean"} <= set(line)

    missing = {**config, "output_dir": str(tmp_path / "refused")}
    missing["reward_funcs"] = ["trl_rewards_beside:needs_a_missing_column"]
    missing.pop("reward_weights")
    result = run(["train", "--config", write_yaml(tmp_path / "conf" / "missing.yaml", missing)], capsys)
    assert_refused(
        result, "trl_rewards_beside:needs_a_missing_column", "'solution'", "['answer']", "f(prompts, responses)"
    )
    assert not (tmp_path / "refused").exists()
    foreign = {**config, "num_generations": 4, "max_steps": 3}
    result = run(["train", "--config", write_yaml(tmp_path / "conf" / "foreign.yaml", foreign)], capsys)
    assert_refused(result, "num_generations", "use samples_per_prompt", "max_steps", "use steps")


def small_run(tmp_path, tiny_models, **overrides) -> str:
    return tiny_run_yaml(tmp_path, tiny_models["llama"][0], **overrides)


def test_a_closed_stdout_does_not_stop_the_run(tmp_path, tiny_models):
    """`fastppo train ... | head`: the reader gone, the run trains on, saves, and exits 0, without a traceback."""
    import subprocess

    from tests.tiny_models import cli_command

    command, env = cli_command("train", "--config", small_run(tmp_path, tiny_models))
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # what `head` does once it has its lines
    err = proc.stderr.read()
    assert proc.wait(timeout=240) == 0, err[-3000:]
    assert "BrokenPipeError" not in err and "Traceback" not in err
    assert (tmp_path / "run" / "checkpoint-2" / "manifest.json").exists()


def test_a_reward_calling_sys_exit_exits_2_naming_it_with_the_last_checkpoint(
    tmp_path, tiny_models, capsys, monkeypatch
):
    from tests.refusal import run

    (tmp_path / "quitting.py").write_text(
        "import sys\ncalls = []\n\n\ndef reward(prompts, responses):\n    calls.append(1)\n"
        "    if len(calls) == 2:\n        sys.exit(0)\n    return [1.0] * len(responses)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    config = small_run(tmp_path, tiny_models, reward_model="quitting:reward", steps=4, save_every=1)
    code, _, err = run(["train", "--config", config], capsys)
    assert code == 2, err[-3000:]
    assert "reward function quitting:reward called sys.exit(0)" in err
    assert f"the last checkpoint, {tmp_path / 'run' / 'checkpoint-1'}, is intact" in err


def test_resume_with_no_checkpoint_yet_starts_fresh(tmp_path, tiny_models, capsys):
    """A launcher can always pass --resume: before the first checkpoint (even before output_dir exists)."""
    from tests.refusal import run

    code, out, err = run(["train", "--config", small_run(tmp_path, tiny_models, steps=1), "--resume"], capsys)
    assert code == 0, err[-3000:]
    assert f"no checkpoint in {tmp_path / 'run'} yet: starting a fresh run" in out and "done: 1 steps" in out


def test_a_disk_that_fills_up_outside_a_checkpoint_exits_4(tmp_path, tiny_models, capsys, monkeypatch):
    import errno

    from fastppo.runtime.metrics import MetricsLogger
    from tests.refusal import run

    def full(self, metrics):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "metrics.jsonl"))

    monkeypatch.setattr(MetricsLogger, "log", full)
    code, _, err = run(["train", "--config", small_run(tmp_path, tiny_models, steps=1)], capsys)
    assert code == 4 and "fastppo train: error: disk full: [Errno 28] No space left on device" in err
