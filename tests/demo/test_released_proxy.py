"""`fastppo demo --model M --proxy`: the proxy-vs-gold lesson's plumbing on a tiny instruct model (the real run is a
benchmark: docs/demo-results.md)."""

import json
import os

from fastppo.cli import main
from fastppo.demo import released_proxy


def test_the_lesson_trains_a_proxy_and_runs_both_arms(tiny_models, tmp_path):
    policy = tiny_models["qwen2"][0]  # chat template, bf16 weights, two end-of-turn ids
    summary = released_proxy.run_lesson(policy, str(tmp_path / "run"), released_proxy.QUICK, seed=0, algo="rloo")
    assert set(summary["arms"]) == {"kl", "no_kl"}
    for arm in summary["arms"].values():
        assert [r["step"] for r in arm["eval"]] == [0, 1, 2]
        assert {"proxy", "gold", "accuracy", "words", "kl"} <= set(arm["eval"][-1])
        assert len(arm["train"]) == released_proxy.QUICK.steps
        assert all(r["gold_correctness"] is not None for r in arm["train"])  # the verifier, logged at weight 0
    assert summary["arms"]["kl"]["kl_control"] and not summary["arms"]["no_kl"]["kl_control"]
    pairs = [json.loads(line) for line in open(tmp_path / "run" / "data" / "preferences.jsonl")]
    assert pairs and all(p["chosen"] != p["rejected"] for p in pairs)
    from fastppo.models import load_tokenizer

    first = [{"role": "user", "content": pairs[0]["prompt"].split("user: ")[-1].split(" <|im_end|>")[0]}]
    rendered = load_tokenizer(policy).apply_chat_template(first, tokenize=False, add_generation_prompt=True)
    assert pairs[0]["prompt"] == rendered  # as the policy sees it
    assert os.path.isfile(tmp_path / "run" / "curves.png")
    assert os.path.isfile(tmp_path / "run" / "reward_model" / "config.json")


def test_labels_prefer_the_verifier_then_the_longer_answer():
    class Batch:  # two answers to each of two problems: 2 + 3 = 5, 4 + 4 = 8
        responses = ["5", "It is 6 I think", "9", "the answer is 7"]

    import torch

    Batch.response_ids = torch.tensor([[1, 2], [1, 1], [1, 2], [1, 1]])
    Batch.response_mask = torch.ones(4, 2)
    golds = released_proxy.gold_scores(Batch, [5, 5, 8, 8], end_ids=[2])
    assert golds == [1.2, 0.0, 0.2, 0.0]


def test_proxy_needs_a_model(capsys):
    assert main(["demo", "--proxy", "--quick"]) == 2
    assert "--proxy needs --model" in capsys.readouterr().err
