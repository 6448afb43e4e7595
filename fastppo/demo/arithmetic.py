"""A task a released chat model can be checked on offline: arithmetic asked in words, one number as the answer.

A problem adds and subtracts two or three whole numbers from 2 to 30 ("What is 12 plus 7?", "Sam has 14 marbles,
finds 9 more and gives away 5. How many marbles does Sam have now?"); its answer is a whole number, and a response
is graded as GSM8K's graders grade: by the last number it writes. The problems are enumerated and split once by a
hash of their text, so the held-out set (`held_out`) never appears in training, whatever the seed.

The rewards follow TRL's reward-function convention: keyword arguments, `completions` and the dataset's columns
(`answer` here), one float per completion.

    correctness                 1.0 when the last number of the completion is the answer, else 0.0
    short_and_ended(end_ids)    0.2 when the completion ended at one of `end_ids` within `SHORT_WORDS` words
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re

LOW, HIGH = 2, 30  # operand range, inclusive
SHORT_WORDS = 6
HELD_OUT_FRACTION = 0.2
INSTRUCTION = "Answer with the number only."
NAMES = ("Sam", "Mia", "Tom", "Ana", "Leo", "Zoe")
THINGS = ("marbles", "apples", "stickers", "coins", "books", "shells")
NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def question(a: int, b: int, c: int | None, sign: int, style: int) -> tuple[str, int]:
    """(question text, answer) of a + b, or a + b + c / a + b - c with `sign` +1 / -1; `style` 0 is symbolic, 1 a
    sentence, 2 a story."""
    answer = a + b + (sign * c if c is not None else 0)
    name, thing = NAMES[(a + b) % len(NAMES)], THINGS[(a * b) % len(THINGS)]
    if c is None:
        text = (
            f"What is {a} + {b}?",
            f"What is {a} plus {b}?",
            f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?",
        )[style]
    else:
        op, word, verb = ("+", "plus", "finds") if sign > 0 else ("-", "minus", "gives away")
        text = (
            f"What is {a} + {b} {op} {c}?",
            f"What is {a} plus {b} {word} {c}?",
            f"{name} has {a} {thing}, gets {b} more and then {verb} {c}. How many {thing} does {name} have now?",
        )[style]
    return f"{text} {INSTRUCTION}", answer


def all_problems() -> list[dict]:
    """Every problem, as rows {"prompt", "answer"}: two operands in three styles, and three operands (a subtraction
    only where the answer stays positive)."""
    rows = []
    numbers = range(LOW, HIGH + 1)
    for a, b in itertools.product(numbers, numbers):
        for style in range(3):
            rows.append(question(a, b, None, 1, style))
            for c, sign in ((a % 9 + 2, 1), (b % 7 + 2, -1)):
                if a + b + sign * c > 0:
                    rows.append(question(a, b, c, sign, style))
    return [{"prompt": text, "answer": answer} for text, answer in rows]


def is_held_out(prompt: str) -> bool:
    digest = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16)
    return digest < HELD_OUT_FRACTION * 16**8


def split(seed: int = 0, n_train: int | None = None, n_held_out: int = 256) -> tuple[list[dict], list[dict]]:
    """(train, held-out) rows: disjoint by `is_held_out`, each shuffled by `seed` and cut to the sizes asked."""
    rows = all_problems()
    train = [r for r in rows if not is_held_out(r["prompt"])]
    held_out = [r for r in rows if is_held_out(r["prompt"])]
    rng = random.Random(seed)
    rng.shuffle(train)
    random.Random(0).shuffle(held_out)  # the same held-out problems for every seed: comparable accuracies
    return train[:n_train], held_out[:n_held_out]


def last_number(text: str) -> float | None:
    found = NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def correctness(completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion's last number is the answer (GSM8K's rule), else 0.0."""
    return [float(last_number(completion_text(c)) == float(a)) for c, a in zip(completions, answer, strict=True)]


def short_and_ended(end_ids):
    """The format reward for a model whose turns end at one of `end_ids`: 0.2 for an answer of at most SHORT_WORDS
    words whose last token ends the turn (fastppo's `completion_ids` keep the end-of-turn token, as TRL's do)."""
    end_ids = set(end_ids)

    def short_and_ended(completions, completion_ids, **kwargs) -> list[float]:
        return [
            0.2 if ids and ids[-1] in end_ids and len(completion_text(c).split()) <= SHORT_WORDS else 0.0
            for c, ids in zip(completions, completion_ids, strict=True)
        ]

    return short_and_ended


def completion_text(completion) -> str:
    """A completion as text: TRL passes conversational completions as [{"role": "assistant", "content": ...}]."""
    if isinstance(completion, list):
        return " ".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    return str(completion)
