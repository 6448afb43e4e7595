"""GRPO with verifiable rewards, written the way a TRL GRPOTrainer script is: a `datasets.Dataset` of conversational
prompts with an `answer` column (arithmetic questions this script generates), an exact-match reward and a format
reward in TRL's reward-function form, and the trainer. Only the config and the trainer's class change:

    TRL                                             fastppo
    GRPOConfig(num_generations=8, beta=0.0,         PPOConfig(advantage_estimator="grpo", samples_per_prompt=8,
               max_completion_length=256, ...)                kl_in_reward=False, kl_loss_coef=0.0,
                                                              max_new_tokens=256, reward_funcs=[...], ...)
    GRPOTrainer(model=..., reward_funcs=[...],      PPOTrainer(config, prompts=dataset)
                args=config, train_dataset=dataset)

    python examples/grpo_arithmetic.py --model path/to/Qwen2.5-0.5B-Instruct --output-dir runs/grpo-arithmetic
    python examples/grpo_arithmetic.py --tiny      # tiny random models built offline (what CI runs): seconds
"""

from __future__ import annotations

import argparse
import random
import re
import tempfile

from datasets import Dataset

from fastppo import PPOConfig, PPOTrainer

SYSTEM = "Answer with the number alone between <answer> and </answer>."
ANSWER = re.compile(r"<answer>\s*(-?\d+)\s*</answer>")


def arithmetic_dataset(n: int, seed: int) -> Dataset:
    """Questions "What is a + b?" with their answers; `prompt` in TRL's conversational form."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"What is {a} + {b}?"}]
        rows.append({"prompt": messages, "answer": str(a + b)})
    return Dataset.from_list(rows)


def exact_match(completions, answer, **kwargs):
    """1.0 when the tagged number is the answer (conversational prompts: each completion is a list of messages)."""
    texts = [completion[0]["content"] for completion in completions]
    return [float(bool(m) and m.group(1) == a) for m, a in zip(map(ANSWER.search, texts), answer, strict=True)]


def format_reward(completions, **kwargs):
    """0.2 for a response that is exactly one tagged number, whatever the number."""
    texts = [completion[0]["content"] for completion in completions]
    return [0.2 if ANSWER.fullmatch(text.strip()) else 0.0 for text in texts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a local instruct model's directory (its chat template renders the prompts)")
    parser.add_argument("--tiny", action="store_true", help="tiny random models built offline, a few steps")
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args()
    if not args.tiny and not args.model:
        parser.error("give --model (a local checkpoint directory) or --tiny")
    with tempfile.TemporaryDirectory(prefix="fastppo-example-") as workdir:  # --tiny's models; gone afterwards
        train(args, workdir)


def train(args, workdir: str) -> None:
    if args.tiny:
        from offline_tiny import save_policy

        words = ["What", "is", "+", "?", "Answer", "with", "the", "number", "alone", "between", "and", "."]
        args.model = save_policy(workdir, words + [str(i) for i in range(19)])

    config = PPOConfig(
        policy_model=args.model,
        reward_funcs=[exact_match, format_reward],  # TRL's reward_funcs and reward_weights
        reward_weights=[1.0, 1.0],
        output_dir=args.output_dir or ("runs/grpo-arithmetic" if not args.tiny else f"{workdir}/run"),
        advantage_estimator="grpo",  # group-normalized advantages, no critic
        samples_per_prompt=2 if args.tiny else 8,  # TRL's num_generations
        rollout_batch_size=8 if args.tiny else 256,  # sequences per step: 32 prompts x 8
        mini_batch_size=4 if args.tiny else 64,
        max_new_tokens=8 if args.tiny else 256,  # TRL's max_completion_length
        kl_in_reward=False,  # GRPO puts its KL (beta) in the loss; TRL's default beta is 0
        kl_loss_coef=0.0,
        learning_rate=1e-6,
        clip_range=0.2,  # TRL's epsilon
        steps=2 if args.tiny else 200,
        save_every=0,
        tensorboard=not args.tiny,
    )
    trainer = PPOTrainer(config, prompts=arithmetic_dataset(64 if args.tiny else 2048, seed=0))
    history = trainer.train()
    last = history[-1]
    print(
        f"step {last['step']}: exact_match {last.get('rewards/exact_match/mean', 0.0):.3f}, "
        f"format {last.get('rewards/format_reward/mean', 0.0):.3f}; metrics in {config.output_dir}/metrics.jsonl"
    )


if __name__ == "__main__":
    main()
