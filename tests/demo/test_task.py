"""The demo task: the gold preference's rules, the corpus's properties, the prompt split, the tokenizer."""

from __future__ import annotations

import pytest

from fastppo.demo import task
from fastppo.demo.tokenizer import build_tokenizer

CATS = "tell me about cats"


@pytest.mark.parametrize(
    "response, gold",
    [
        ("the kitten is good and the purr is warm and fur is very lovely", 6.0),  # the best kind of answer
        ("the kitten is good", 2.0),
        ("the oven is good", 0.5),  # off-topic noun
        ("the kitten is awful", 0.0),  # negative adjective
        ("the kitten is good and the kitten is good", 0.0),  # repeated noun and adjective: -1 each
        ("kitten purr good", -1.0),  # not a clause
        ("the kitten is good good good", -3.0),  # a broken clause, and two repeats inside it
        ("the kitten is good and", 1.0),  # an empty clause is a broken one
        ("", -2.0),
    ],
)
def test_gold_rules(response, gold):
    assert task.gold_reward(CATS, response) == gold


def test_gold_penalizes_length_beyond_the_limit():
    clauses = ["the kitten is very good", "the purr is very warm", "the fur is very lovely", "the paw is very great"]
    four = " and ".join(clauses)  # 23 words, four good clauses
    assert len(four.split()) == 23
    assert task.gold_reward(CATS, four) == 8.0 - (23 - task.MAX_GOOD_WORDS)
    assert task.gold_reward(CATS, four) < task.gold_reward(CATS, " and ".join(clauses[:3]))


def test_corpus_stays_inside_what_gold_does_not_penalize():
    vocabulary = set(task.vocabulary())
    for row in task.sft_corpus(500, seed=3):
        words = row["response"].split()
        clauses = task.split_clauses(words)
        assert 1 <= len(clauses) <= task.MAX_CLAUSES
        assert all(task.parse_clause(c) is not None for c in clauses)
        content = [w for w in words if w not in task.FUNCTION_WORDS]
        assert len(content) == len(set(content)), "the corpus never repeats a content word"
        assert len(words) <= task.MAX_GOOD_WORDS + 1
        assert set(words) <= vocabulary and row["prompt"] in task.prompts()[0]


def test_corpus_and_pairs_are_deterministic_and_seeded():
    assert task.sft_corpus(20, seed=1) == task.sft_corpus(20, seed=1)
    assert task.sft_corpus(20, seed=1) != task.sft_corpus(20, seed=2)
    assert task.preference_pairs(20, seed=1) == task.preference_pairs(20, seed=1)


def test_preference_labels_follow_gold_with_some_noise():
    pairs = task.preference_pairs(1000, seed=0)
    margins = [task.gold_reward(p["prompt"], p["chosen"]) - task.gold_reward(p["prompt"], p["rejected"]) for p in pairs]
    assert 0 not in margins
    agreement = sum(m > 0 for m in margins) / len(margins)
    assert 0.8 < agreement < 0.99, agreement


def test_prompt_split():
    train, heldout = task.prompts()
    assert not set(train) & set(heldout)
    assert len(heldout) == 20
    for topic in task.TOPICS:
        assert any(task.topic_of(p) == topic for p in train) and any(task.topic_of(p) == topic for p in heldout)


def test_tokenizer_round_trip():
    tokenizer = build_tokenizer()
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert len(tokenizer) == 4 + len(task.vocabulary())
    ids = tokenizer(CATS)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
    response = "the kitten is very good"
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    text = tokenizer.decode(ids + response_ids + [tokenizer.eos_token_id], skip_special_tokens=True)
    assert text == f"{CATS} {response}"
