"""The arithmetic task: answers right by construction, held-out problems never in training, GSM8K-style grading."""

import re

from fastppo.demo import arithmetic


def test_every_answer_is_the_arithmetic_of_its_question():
    for row in arithmetic.all_problems():
        numbers = [int(x) for x in re.findall(r"\d+", row["prompt"])]
        words = row["prompt"]
        subtracted = " - " in words or " minus " in words or "gives away" in words
        expected = numbers[0] + numbers[1] + (0 if len(numbers) == 2 else -numbers[2] if subtracted else numbers[2])
        assert row["answer"] == expected > 0, row


def test_the_held_out_problems_are_never_trained_on_whatever_the_seed():
    _, held_out = arithmetic.split(seed=0)
    for seed in (0, 1, 2):
        train, again = arithmetic.split(seed=seed)
        assert again == held_out and len(held_out) >= 200
        assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}


def test_the_last_number_grades_and_a_short_ended_answer_gets_the_format_reward():
    completions = ["3 + 4 = 7", "7, or maybe 8", "seven", [{"role": "assistant", "content": "It is 1,007."}]]
    assert arithmetic.correctness(completions, [7, 7, 7, 1007]) == [1.0, 0.0, 0.0, 1.0]
    reward = arithmetic.short_and_ended(end_ids=[2])
    ids = [[22, 2], [22, 22], [9, 9, 9, 9, 9, 9, 9, 2]]  # ended; cut at max_new_tokens; ended but wordy
    assert reward(["7", "7", "the sum of the two numbers is 7"], completion_ids=ids) == [0.2, 0.0, 0.0]
