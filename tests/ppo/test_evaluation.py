"""Evaluation during training (eval_prompts, eval_every) and the completions table (completions.jsonl,
log_completions, num_completions_to_print), on a model as released."""

import json

import pytest

from fastppo import PPOTrainer
from fastppo.runtime.errors import InputError
from tests.tiny_models import count_w7, prompt_list, small_config

EVAL_PROMPTS = ["w1 w2", "w3 w4 w5", "w6", "w7 w8", "w9 w10 w11"]  # 5: one chunk of 4 and one of 1


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_eval_every_logs_eval_metrics_and_the_completions(tiny_llama, tmp_path):
    policy, reward = tiny_llama
    config = small_config(tmp_path, policy_model=policy, reward_model=reward, steps=2, eval_every=1)
    trainer = PPOTrainer(config, prompts=prompt_list(), eval_prompts=EVAL_PROMPTS)
    history = trainer.train()
    for metrics in history:
        for name in ("eval/score_mean", "eval/score_std", "eval/kl", "eval/response_length_mean", "eval/ended_rate"):
            assert name in metrics, name
        assert 0 <= metrics["eval/ended_rate"] <= 1 and metrics["perf/eval_s"] > 0
    rows = read_jsonl(tmp_path / "run" / "completions.jsonl")
    assert [(row["step"], row["split"]) for row in rows] == [(1, "eval")] * 5 + [(2, "eval")] * 5
    assert [row["prompt"] for row in rows[:5]] == EVAL_PROMPTS  # each held-out prompt once, in order
    assert {"completion", "score", "ended", "length", "kl"} <= set(rows[0])
    first = rows[:5]
    assert history[0]["eval/score_mean"] == pytest.approx(sum(r["score"] for r in first) / 5)
    assert history[0]["eval/kl"] == pytest.approx(sum(r["kl"] for r in first) / 5)
    assert abs(history[0]["eval/kl"]) < 0.5  # one small step away from the reference


def test_evaluation_does_not_change_the_training_run(tiny_llama, tmp_path):
    policy, _ = tiny_llama
    runs = []
    for name, extra in (("plain", {}), ("evaluated", {"eval_every": 1, "eval_prompts": EVAL_PROMPTS})):
        config = small_config(tmp_path / name, policy_model=policy, steps=2, **extra)
        runs.append(PPOTrainer(config, reward=count_w7, prompts=prompt_list()).train())
    for plain, evaluated in zip(*runs, strict=True):
        assert plain["policy/loss"] == evaluated["policy/loss"]  # its own random stream: training draws the same


def test_greedy_evaluation_is_deterministic_and_estimates_no_kl(tiny_llama, tmp_path):
    policy, _ = tiny_llama
    config = small_config(tmp_path, policy_model=policy, steps=1, eval_every=1, eval_greedy=True)
    trainer = PPOTrainer(config, reward=count_w7, prompts=prompt_list(), eval_prompts=EVAL_PROMPTS)
    first, second = trainer.evaluate(), trainer.evaluate()
    assert first == second and "eval/kl" not in first  # greedy answers are no samples of the policy


def test_log_completions_writes_the_training_batches_and_prints_some(tiny_llama, tmp_path, capsys):
    policy, _ = tiny_llama
    config = small_config(tmp_path, policy_model=policy, log_completions=True, num_completions_to_print=1)
    PPOTrainer(config, reward=count_w7, prompts=prompt_list()).train()
    rows = read_jsonl(tmp_path / "run" / "completions.jsonl")
    assert [(row["step"], row["split"]) for row in rows] == [(1, "train")] * 4 + [(2, "train")] * 4
    assert all(row["score"] == row["completion"].split().count("w7") for row in rows)  # each row's own score
    assert capsys.readouterr().out.count("completion:") == 2  # one per step


def test_completions_are_kept_up_to_the_checkpoint_on_resume(tiny_llama, tmp_path):
    policy, _ = tiny_llama
    config = small_config(tmp_path, policy_model=policy, steps=2, save_every=1, log_completions=True)
    PPOTrainer(config, reward=count_w7, prompts=prompt_list()).train()
    resumed = small_config(tmp_path, policy_model=policy, steps=2, log_completions=True)
    resumed.resume_from = str(tmp_path / "run" / "checkpoint-1")
    PPOTrainer(resumed, reward=count_w7, prompts=prompt_list()).train()
    steps = [row["step"] for row in read_jsonl(tmp_path / "run" / "completions.jsonl")]
    assert steps == [1] * 4 + [2] * 4  # step 2's rows once: the first run's were dropped at resume


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"eval_every": 2}, "eval_prompts"),
        ({"eval_prompts": ["w1"]}, "eval_every"),
        ({"num_completions_to_print": 2}, "log_completions"),
        ({"eval_every": 1, "eval_prompts": []}, "eval_prompts"),
    ],
)
def test_settings_that_would_do_nothing_are_refused(tmp_path, settings, named):
    with pytest.raises(InputError, match=named):
        small_config(tmp_path, **settings).validate()


def test_evaluate_without_eval_prompts_names_them(tiny_llama, tmp_path):
    trainer = PPOTrainer(small_config(tmp_path, policy_model=tiny_llama[0]), reward=count_w7, prompts=prompt_list())
    with pytest.raises(InputError, match="eval_prompts"):
        trainer.evaluate()


def test_evaluation_scores_with_every_reward_combined_as_training_does(tiny_llama, tmp_path):
    """Several rewards (TRL's reward_funcs with reward_weights): an eval row's score is their weighted sum, a reward
    that does not apply (None) counting 0, as the training batches' scores are."""
    policy, _ = tiny_llama

    def length(prompts, responses):
        return [float(len(r.split())) for r in responses]

    def only_long(prompts, responses):
        return [1.0 if len(r.split()) > 3 else None for r in responses]

    config = small_config(tmp_path, policy_model=policy, reward_weights=[1.0, 0.5, 2.0], eval_every=1, eval_greedy=True)
    trainer = PPOTrainer(config, reward=[count_w7, length, only_long], prompts=prompt_list(), eval_prompts=EVAL_PROMPTS)
    metrics = trainer.evaluate()
    rows = read_jsonl(tmp_path / "run" / "completions.jsonl")
    for row in rows:
        words = row["completion"].split()
        expected = words.count("w7") + 0.5 * len(words) + (2.0 if len(words) > 3 else 0.0)
        assert row["score"] == pytest.approx(expected)
    assert metrics["eval/score_mean"] == pytest.approx(sum(row["score"] for row in rows) / len(rows))


def test_eval_prompts_are_one_split_whatever_prompts_split_names(tiny_llama, tmp_path):
    """TRL's layout: train on one split of a DatasetDict (prompts_split), evaluate on another split's Dataset or on a
    list; the split name is the training prompts'. A DatasetDict as eval_prompts would be read at the training split:
    refused."""
    datasets = pytest.importorskip("datasets")
    policy, _ = tiny_llama
    splits = datasets.DatasetDict(
        {
            "train_prefs": datasets.Dataset.from_list([{"prompt": p} for p in prompt_list(8)]),
            "test_prefs": datasets.Dataset.from_list([{"prompt": p} for p in prompt_list(3, seed=1)]),
        }
    )
    config = small_config(tmp_path, policy_model=policy, steps=1, eval_every=1, prompts_split="train_prefs")
    trainer = PPOTrainer(config, reward=count_w7, prompts=splits, eval_prompts=splits["test_prefs"])
    assert [str(p) for p in trainer.eval_prompts] == prompt_list(3, seed=1)
    assert "eval/score_mean" in trainer.train()[0]
    listed = small_config(tmp_path / "list", policy_model=policy, eval_every=1, prompts_split="train_prefs")
    trainer = PPOTrainer(listed, reward=count_w7, prompts=splits, eval_prompts=["w1 w2"])
    assert [str(p) for p in trainer.eval_prompts] == ["w1 w2"]
    fresh = small_config(tmp_path / "splits", policy_model=policy, eval_every=1, prompts_split="train_prefs")
    with pytest.raises(InputError, match="eval_prompts: a dataset with splits .*dataset\\['test'\\]"):
        PPOTrainer(fresh, reward=count_w7, prompts=splits, eval_prompts=splits)


def exact_answer(completions, answer, **kwargs):
    return [float(c.strip() == a) for c, a in zip(completions, answer, strict=True)]


def test_eval_prompts_without_a_column_a_reward_needs_are_refused_before_training(tiny_llama, tmp_path):
    """A TRL-form reward reading a dataset column: the eval prompts must have it too, checked at start-up (by the
    CLI before anything loads), not by a crash at the first evaluation steps into the run."""
    from fastppo.cli.train import check_inputs

    policy, _ = tiny_llama
    prompts = [{"prompt": p, "answer": "w7"} for p in prompt_list(8)]
    config = small_config(tmp_path, policy_model=policy, steps=1, eval_every=1)
    with pytest.raises(InputError, match="exact_answer \\(on eval_prompts\\).*'answer'"):
        PPOTrainer(config, reward=exact_answer, prompts=prompts, eval_prompts=["w1 w2", "w3"])
    spec = f"{__name__}:exact_answer"
    cli = small_config(tmp_path, policy_model=policy, reward_model=spec, prompts=prompts, eval_prompts=["w1 w2"])
    with pytest.raises(InputError, match="on eval_prompts.*'answer'"):
        check_inputs(cli)
    trainer = PPOTrainer(config, reward=exact_answer, prompts=prompts, eval_prompts=prompts[:3])
    assert "eval/score_mean" in trainer.train()[0]
