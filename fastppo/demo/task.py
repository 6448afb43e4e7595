"""The demo's generated task: prompts about a topic, one-line answers, and a hidden "gold" preference.

A prompt asks about one of ten topics ("tell me about coffee"); an answer is one to three clauses joined by
"and", each clause "[the] NOUN is [very] ADJECTIVE" ("the espresso is warm and the mug is very sweet").

The gold reward plays the human labeller. It likes well-formed clauses about the asked topic with positive
adjectives (+1 per on-topic noun, +1 per positive adjective), and dislikes off-topic nouns (-0.5), negative
adjectives (-1), broken clauses (-1), every repeat of a content word (-1) and each word beyond `MAX_GOOD_WORDS`
(-1). Its best answers are three good clauses: +6.

The generated corpus (used for SFT and, labelled by gold, for the reward model's preference pairs) has answers of
varied quality but never repeats a content word and never exceeds three clauses. Inside that distribution "more
positive on-topic words" goes with "better", so a reward model trained on it learns exactly that, and has no way
to learn gold's penalties for repetition and length. That is the gap a policy optimized without KL control
exploits, and the reason RLHF evaluates against something other than the proxy.
"""

from __future__ import annotations

import math
import random

TOPICS: dict[str, tuple[str, ...]] = {
    "cats": ("kitten", "purr", "whisker", "paw", "fur", "meow"),
    "dogs": ("puppy", "bark", "leash", "fetch", "collar", "kennel"),
    "rain": ("cloud", "puddle", "umbrella", "storm", "drizzle", "thunder"),
    "music": ("song", "melody", "rhythm", "guitar", "drum", "chorus"),
    "coffee": ("cup", "bean", "roast", "espresso", "mug", "aroma"),
    "ocean": ("wave", "sand", "tide", "shore", "reef", "boat"),
    "books": ("page", "story", "chapter", "author", "library", "novel"),
    "trees": ("leaf", "root", "branch", "forest", "shade", "oak"),
    "stars": ("night", "sky", "comet", "moon", "galaxy", "orbit"),
    "bread": ("dough", "crust", "oven", "flour", "loaf", "butter"),
}
POSITIVE = ("good", "great", "lovely", "warm", "bright", "happy", "calm", "sweet")
NEGATIVE = ("bad", "dull", "sad", "cold", "boring", "awful", "grim", "sour")
PROMPT_TEMPLATES = (
    "tell me about {}",
    "write about {}",
    "describe {}",
    "say something about {}",
    "what do you think of {}",
    "talk about {}",
    "give me a line about {}",
    "share a thought on {}",
)
FUNCTION_WORDS = ("the", "is", "very", "and")
MAX_CLAUSES = 3  # the corpus never has more; gold's length limit makes a fourth clause a loss
MAX_GOOD_WORDS = 16  # gold takes 1 point per word beyond this

NOUN_TOPIC = {noun: topic for topic, nouns in TOPICS.items() for noun in nouns}
ALL_NOUNS = tuple(NOUN_TOPIC)


def vocabulary() -> list[str]:
    """Every word the task can produce, in a fixed order (the tokenizer's vocabulary after its special tokens)."""
    words: list[str] = []
    for text in (*PROMPT_TEMPLATES, " ".join(TOPICS), " ".join(ALL_NOUNS), " ".join(POSITIVE + NEGATIVE)):
        words += [w for w in text.split() if w != "{}"]
    words += FUNCTION_WORDS
    return list(dict.fromkeys(words))


# ----------------------------------------------------------------------------------------------
# prompts
# ----------------------------------------------------------------------------------------------


def prompts() -> tuple[list[str], list[str]]:
    """(train prompts, held-out prompts): every template x topic, a quarter of the pairs held out for evaluation."""
    train, heldout = [], []
    for t, template in enumerate(PROMPT_TEMPLATES):
        for k, topic in enumerate(TOPICS):
            (heldout if (t + k) % 4 == 0 else train).append(template.format(topic))
    return train, heldout


def topic_of(prompt: str) -> str | None:
    words = prompt.split()
    return next((w for w in reversed(words) if w in TOPICS), None)


# ----------------------------------------------------------------------------------------------
# the gold preference
# ----------------------------------------------------------------------------------------------


def parse_clause(words: list[str]) -> tuple[str, str] | None:
    """(noun, adjective) of a clause "[the] NOUN is [very] ADJ", or None when the clause is not of that form."""
    if words[:1] == ["the"]:
        words = words[1:]
    if len(words) == 4 and words[2] == "very":
        words = [words[0], words[1], words[3]]
    if len(words) == 3 and words[0] in NOUN_TOPIC and words[1] == "is" and words[2] in POSITIVE + NEGATIVE:
        return words[0], words[2]
    return None


def split_clauses(words: list[str]) -> list[list[str]]:
    clauses: list[list[str]] = [[]]
    for w in words:
        if w == "and":
            clauses.append([])
        else:
            clauses[-1].append(w)
    return clauses


def gold_reward(prompt: str, response: str) -> float:
    """The hidden labeller's score of `response` to `prompt` (higher is better; best answers score about +6)."""
    words = response.split()
    if not words:
        return -2.0
    topic = topic_of(prompt)
    content = [w for w in words if w not in FUNCTION_WORDS]
    score = -float(len(content) - len(set(content)))  # each repeat of a content word, wherever it is
    seen: set[str] = set()
    for clause in split_clauses(words):
        parsed = parse_clause(clause)
        if parsed is None:
            score -= 1.0
            continue
        noun, adjective = parsed
        if noun not in seen:
            score += 1.0 if NOUN_TOPIC[noun] == topic else -0.5
        if adjective not in seen:
            score += 1.0 if adjective in POSITIVE else -1.0
        seen.update(parsed)
    return score - max(0, len(words) - MAX_GOOD_WORDS)


def gold_rewards(prompts: list[str], responses: list[str]) -> list[float]:
    """`gold_reward` over a batch: the signature of a fastppo reward function."""
    return [gold_reward(p, r) for p, r in zip(prompts, responses, strict=True)]


# ----------------------------------------------------------------------------------------------
# the generated corpus and the preference pairs
# ----------------------------------------------------------------------------------------------


def sample_response(rng: random.Random, topic: str) -> str:
    """One corpus answer about `topic`; its quality (how on-topic, how positive) is drawn per answer."""
    on_topic, positive = rng.uniform(0.1, 1.0), rng.uniform(0.1, 1.0)
    nouns = rng.sample(TOPICS[topic], MAX_CLAUSES)
    off_topic = rng.sample([n for n in ALL_NOUNS if NOUN_TOPIC[n] != topic], MAX_CLAUSES)
    good, bad = rng.sample(POSITIVE, MAX_CLAUSES), rng.sample(NEGATIVE, MAX_CLAUSES)
    clauses = []
    for i in range(rng.randint(1, MAX_CLAUSES)):
        noun = nouns[i] if rng.random() < on_topic else off_topic[i]
        adjective = good[i] if rng.random() < positive else bad[i]
        the = "the " if rng.random() < 0.7 else ""
        very = "very " if rng.random() < 0.3 else ""
        clauses.append(f"{the}{noun} is {very}{adjective}")
    return " and ".join(clauses)


def sft_corpus(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` {prompt, response} examples over the train prompts."""
    rng = random.Random(seed)
    train_prompts, _ = prompts()
    rows = []
    for _ in range(n):
        prompt = rng.choice(train_prompts)
        rows.append({"prompt": prompt, "response": sample_response(rng, topic_of(prompt))})
    return rows


def preference_pairs(n: int, seed: int = 0, beta: float = 2.0) -> list[dict[str, str]]:
    """`n` {prompt, chosen, rejected} pairs of corpus answers, labelled by gold with Bradley-Terry noise.

    The labeller prefers answer a with probability sigmoid(beta * (gold(a) - gold(b))), like a careful human who
    still errs on close calls; pairs that gold scores equal are skipped.
    """
    rng = random.Random(seed)
    train_prompts, _ = prompts()
    rows = []
    while len(rows) < n:
        prompt = rng.choice(train_prompts)
        topic = topic_of(prompt)
        a, b = sample_response(rng, topic), sample_response(rng, topic)
        margin = gold_reward(prompt, a) - gold_reward(prompt, b)
        if margin == 0:
            continue
        if rng.random() >= 1 / (1 + math.exp(-beta * margin)):
            a, b = b, a
        rows.append({"prompt": prompt, "chosen": a, "rejected": b})
    return rows
