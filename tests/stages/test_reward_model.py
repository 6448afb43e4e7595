"""`fastppo reward-model`: Bradley-Terry training learns the preference, checkpoints reload, bad lines are named."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fastppo.cli import main
from fastppo.demo import task
from fastppo.runtime.errors import InputError
from fastppo.runtime.validation import read_records
from fastppo.stages.common import split_pairs
from fastppo.stages.reward_model import load_reward_model, pairwise_accuracy, score


def sentiment_pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Pairs that differ only in the adjective: chosen positive, rejected negative."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = rng.choice(list(task.TOPICS))
        noun = rng.choice(task.TOPICS[topic])
        rows.append(
            {
                "prompt": f"tell me about {topic}",
                "chosen": f"the {noun} is {rng.choice(task.POSITIVE)}",
                "rejected": f"the {noun} is {rng.choice(task.NEGATIVE)}",
            }
        )
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_bad_line_names_file_and_line(tmp_path):
    rows = sentiment_pairs(2)
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1]) + "\n" + '{"prompt": "p", "chosen": "c"}\n')
    with pytest.raises(InputError, match=r'prefs\.jsonl:3: field "rejected" is missing'):
        read_records(str(path), ("prompt", "chosen", "rejected"))


def test_cli_reports_bad_input_with_exit_code_2(tmp_path, base_model, capsys):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(sentiment_pairs(1)[0]) + "\nnot json\n")
    assert main(["reward-model", "--model", base_model, "--data", str(path), "--output-dir", str(tmp_path / "o")]) == 2
    assert "prefs.jsonl:2: not valid JSON" in capsys.readouterr().err


def test_split_is_disjoint_and_deterministic():
    pairs = sentiment_pairs(50)
    train, held_out = split_pairs(pairs, 0.1, seed=3)
    assert len(held_out) == 5 and len(train) == 45
    assert sorted(map(json.dumps, train + held_out)) == sorted(map(json.dumps, pairs))
    assert split_pairs(pairs, 0.1, seed=3) == (train, held_out)


def test_reward_model_learns_preference_and_checkpoint_reloads(tmp_path, base_model):
    data = write_jsonl(tmp_path / "prefs.jsonl", sentiment_pairs(400))
    held_out = sentiment_pairs(100, seed=1)
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    untrained = pairwise_accuracy(load_reward_model(base_model, tokenizer), tokenizer, held_out)

    out = tmp_path / "rm"
    argv = ["reward-model", "--model", base_model, "--data", data, "--output-dir", str(out)]
    assert main([*argv, "--epochs", "2", "--learning-rate", "3e-3", "--batch-size", "16"]) == 0
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    trained = pairwise_accuracy(model, AutoTokenizer.from_pretrained(out), held_out)
    assert trained > 0.95 and trained > untrained + 0.2, f"accuracy {untrained:.2f} -> {trained:.2f}"


def test_score_reads_the_last_token_whatever_the_padding(base_model):
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = load_reward_model(base_model, tokenizer)
    prompts = ["tell me about cats", "describe rain"]
    responses = ["the kitten is good and the purr is warm and fur is lovely", "cloud is sad"]
    batched = score(model, tokenizer, prompts, responses)
    alone = [score(model, tokenizer, [p], [r])[0] for p, r in zip(prompts, responses, strict=True)]
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(alone), atol=1e-5, rtol=1e-5)
    assert batched[0] != batched[1]


def test_the_same_seed_trains_the_same_reward_model(tmp_path, base_model):
    """The score head is new: it must be drawn from --seed, not from whatever the process's RNG held."""
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "prefs.jsonl", sentiment_pairs(16))
    weights = []
    for run in ("a", "b"):
        torch.manual_seed(ord(run))  # a different process state before each run
        argv = ["reward-model", "--model", base_model, "--data", data, "--output-dir", str(tmp_path / run)]
        assert main([*argv, "--epochs", "1", "--batch-size", "8", "--seed", "3"]) == 0
        weights.append(load_file(tmp_path / run / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.parametrize("micro", [{"micro_batch_size": 1}, {"micro_batch_tokens": 30}])
def test_micro_batches_accumulate_the_whole_batch_gradient(monkeypatch, base_model, micro):
    """Pairs in length-sorted micro-batches (a pair's chosen and rejected together): the step's loss, accuracy and
    gradient are the whole batch's."""
    import fastppo.stages.reward_model as reward_model
    from tests.stages.test_sft import recorded_steps

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    pairs = sentiment_pairs(5, seed=1)
    pairs[0]["chosen"] += " and the kitten is good and the storm is calm"  # lengths that differ
    results = []
    for options in ({}, micro):
        steps = recorded_steps(monkeypatch, reward_model)
        torch.manual_seed(0)  # the new score head
        model = load_reward_model(base_model, tokenizer)
        summary = reward_model.train_reward_model(
            model, tokenizer, pairs, epochs=1, batch_size=5, eval_fraction=0.0, log=lambda line: None, **options
        )
        assert summary["steps"] == 1 and len(steps) == 1
        results.append((summary, steps[0]))
        monkeypatch.undo()
    (whole, grads), (parts, micro_grads) = results
    assert parts["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    assert parts["train_accuracy"] == whole["train_accuracy"]
    for name, grad in grads.items():
        torch.testing.assert_close(micro_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)
