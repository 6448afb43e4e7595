"""PPO with a learned reward model, written the way a TRL PPOTrainer script (trl.experimental.ppo) is: a reward model
loaded with transformers and passed as an object, a `datasets.Dataset` of prompts, the trainer. fastppo's PPO keeps
the value head on the policy's backbone (critic: shared) and the frozen reference as a copy of the initial policy, so
there is no value_model or ref_model to build; the reward model keeps its own tokenizer (found in its directory, or
given as reward_tokenizer=).

    TRL                                                fastppo
    PPOConfig(num_ppo_epochs=4, response_length=53,    PPOConfig(ppo_epochs=4, max_new_tokens=53, kl_coef=0.05,
              kl_coef=0.05, cliprange=0.2, ...)                  clip_range=0.2, ...)
    PPOTrainer(args, processing_class, model,          PPOTrainer(config, reward=reward_model, prompts=dataset)
               ref_model, reward_model, train_dataset,
               value_model)

    python examples/ppo_reward_model.py --model path/to/sft-model --reward-model path/to/reward-model
    python examples/ppo_reward_model.py --tiny      # tiny random models built offline (what CI runs): seconds
"""

from __future__ import annotations

import argparse
import random
import tempfile

from datasets import Dataset
from transformers import AutoModelForSequenceClassification

from fastppo import PPOConfig, PPOTrainer

TOPICS = ["rain", "coffee", "music", "the ocean", "bread", "trees", "the stars", "books"]
TEMPLATES = ["Write one sentence about {}.", "Describe {} in a few words."]


def prompts_dataset(n: int, seed: int) -> Dataset:
    """Conversational prompts (TRL's "prompt": [messages] form)."""
    rng = random.Random(seed)
    asks = [rng.choice(TEMPLATES).format(rng.choice(TOPICS)) for _ in range(n)]
    return Dataset.from_list([{"prompt": [{"role": "user", "content": ask}]} for ask in asks])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="the SFT policy's local directory")
    parser.add_argument("--reward-model", help="a 1-label sequence classifier's local directory")
    parser.add_argument("--tiny", action="store_true", help="tiny random models built offline, a few steps")
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args()
    if not args.tiny and not (args.model and args.reward_model):
        parser.error("give --model and --reward-model (local checkpoint directories), or --tiny")
    with tempfile.TemporaryDirectory(prefix="fastppo-example-") as workdir:  # --tiny's models; gone afterwards
        train(args, workdir)


def train(args, workdir: str) -> None:
    if args.tiny:
        from offline_tiny import save_policy, save_reward_model

        words = ["Write", "one", "sentence", "about", "Describe", "in", "a", "few", "words", "."]
        words += [word for topic in TOPICS for word in topic.split()]
        args.model, args.reward_model = save_policy(workdir, words), save_reward_model(workdir, words)

    reward_model = AutoModelForSequenceClassification.from_pretrained(args.reward_model, num_labels=1)
    config = PPOConfig(
        policy_model=args.model,
        output_dir=args.output_dir or ("runs/ppo-reward-model" if not args.tiny else f"{workdir}/run"),
        ppo_epochs=1 if args.tiny else 4,  # TRL's num_ppo_epochs
        rollout_batch_size=4 if args.tiny else 64,
        mini_batch_size=2 if args.tiny else 16,
        max_new_tokens=8 if args.tiny else 53,  # TRL's response_length
        temperature=0.7,
        kl_coef=0.05,
        clip_range=0.2,  # TRL's cliprange
        clip_range_value=0.2,  # TRL's cliprange_value
        vf_coef=0.1,
        missing_eos_penalty=1.0,
        learning_rate=3e-6,
        steps=2 if args.tiny else 200,
        tensorboard=not args.tiny,
    )
    trainer = PPOTrainer(config, reward=reward_model, prompts=prompts_dataset(32 if args.tiny else 1024, seed=0))
    history = trainer.train()
    last = history[-1]
    print(f"step {last['step']}: score {last['reward/score_mean']:.3f}, KL {last['policy/kl']:.3f}")


if __name__ == "__main__":
    main()
