"""`fastppo demo --model smollm2-135m-instruct`: PPO on a released chat model, checked on problems it never saw.

The model answers arithmetic asked in words (`arithmetic.py`). Its reward is a verifier, written as a TRL user writes
one: 1 for the right last number, 0.2 more for a short answer that ends its turn. Before and after PPO it answers the
held-out problems greedily; the run prints the held-out accuracy, the answers' length and the KL to the starting
model, writes the trained policy to <output_dir>/final (an ordinary checkpoint: `AutoModelForCausalLM`), and keeps
summary.json and the held-out answers beside it. `--model` takes any local instruct checkpoint with a chat template
(or a GGUF file) too; `--algo` (here RLOO unless given), `--seed`, `--no-kl-control` and `--quick` mean what they mean
for the built-in demo.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time

from fastppo.demo import arithmetic

EVALUATE_SEED = 1234
# RLOO unless --algo says otherwise: its baseline is the other answers to the same problem, where PPO's critic starts
# as a random value head over a sparse end-of-answer reward (docs/demo-results.md compares the two).
DEFAULT_ALGO = "rloo"


@dataclasses.dataclass(frozen=True)
class ReleasedSettings:
    """The RL budget on a released model. FULL is sized for 2 CPU cores (docs/demo-results.md has its timing);
    QUICK is the plumbing check the tests run on tiny models."""

    steps: int = 52
    rollout_batch_size: int = 32
    mini_batch_size: int = 16
    ppo_epochs: int = 1
    learning_rate: float = 1e-5
    lora_rank: int = 0
    temperature: float = 0.7
    max_new_tokens: int = 32
    max_prompt_length: int = 128
    kl_coef: float = 0.05
    adaptive_kl_target: float = 2.0
    held_out: int = 256


FULL = ReleasedSettings()
QUICK = ReleasedSettings(steps=2, rollout_batch_size=4, mini_batch_size=4, ppo_epochs=1, max_new_tokens=8, held_out=8)


def conversation(row: dict) -> dict:
    """A problem as TRL's conversational record: the question as the user's turn, the answer as a column."""
    return {"prompt": [{"role": "user", "content": row["prompt"]}], "answer": row["answer"]}


def run(args) -> int:
    from fastppo.runtime.validation import refuse_non_empty_dir

    if getattr(args, "proxy", False):
        from fastppo.demo import released_proxy

        return released_proxy.run(args)

    output_dir = args.output_dir or os.path.join("runs", time.strftime("demo-released-%Y%m%d-%H%M%S"))
    refuse_non_empty_dir("--output-dir", output_dir)
    summary = run_released(
        args.model,
        output_dir,
        QUICK if args.quick else FULL,
        seed=args.seed or 0,
        algo=args.algo or DEFAULT_ALGO,
        kl_control=not args.no_kl_control,
    )
    print(summary_text(summary))
    return 0


def run_released(model: str, output_dir: str, settings: ReleasedSettings, seed: int, algo: str, kl_control: bool):
    from fastppo.ppo.trainer import PPOTrainer
    from fastppo.runtime.model_sources import resolve

    start = time.perf_counter()
    os.makedirs(output_dir, exist_ok=True)
    source = resolve(model, "--model")
    end_ids = end_ids_of(source, model)
    train_rows, held_out = arithmetic.split(seed, n_held_out=settings.held_out)
    rewards = verifier_rewards(end_ids)
    config = ppo_config(source, settings, rewards, os.path.join(output_dir, "run"), seed, algo, kl_control)
    trainer = PPOTrainer(config, prompts=[conversation(r) for r in train_rows])
    setup_seconds = time.perf_counter() - start

    print(f"fastppo demo: {model}, held-out accuracy before PPO ({len(held_out)} problems, greedy)")
    before = evaluate(trainer, held_out)
    print(f"  accuracy {before['accuracy']:.3f}, {before['words']:.1f} words; PPO ({algo}), {settings.steps} steps")
    start_rl = time.perf_counter()
    history = trainer.train()
    rl_seconds = time.perf_counter() - start_rl
    after = evaluate(trainer, held_out)
    final = os.path.join(output_dir, "final")
    save_final(trainer, final)

    recent = history[-10:]
    summary = {
        "model": model,
        "algo": algo,
        "seed": seed,
        "kl_control": kl_control,
        "settings": dataclasses.asdict(settings),
        "before": {k: v for k, v in before.items() if k != "responses"},
        "after": {k: v for k, v in after.items() if k != "responses"},
        "kl": statistics.fmean(m["policy/kl"] for m in recent),
        "train_correctness": [m.get("rewards/correctness/mean") for m in history],
        "seconds": {"setup": setup_seconds, "rl": rl_seconds, "total": time.perf_counter() - start},
        "final": final,
        "output_dir": output_dir,
    }
    with open(os.path.join(output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(output_dir, "held_out_answers.jsonl"), "w") as f:
        for row, old, new in zip(held_out, before["responses"], after["responses"], strict=True):
            f.write(json.dumps({"prompt": row["prompt"], "answer": row["answer"], "before": old, "after": new}) + "\n")
    return summary


def ppo_config(source, settings, rewards, output_dir, seed, algo, kl_control, reward_weights=None):
    """The RL run's PPOConfig: `settings` (ReleasedSettings or a subclass), `rewards` as TRL's reward_funcs."""
    from fastppo.demo.pipeline import algorithm_overrides
    from fastppo.ppo.config import PPOConfig

    return PPOConfig(
        policy_model=source,
        reward_funcs=rewards,
        reward_weights=reward_weights,
        output_dir=output_dir,
        steps=settings.steps,
        rollout_batch_size=settings.rollout_batch_size,
        mini_batch_size=settings.mini_batch_size,
        ppo_epochs=settings.ppo_epochs,
        learning_rate=settings.learning_rate,
        lora_rank=settings.lora_rank,
        temperature=settings.temperature,
        max_new_tokens=settings.max_new_tokens,
        max_prompt_length=settings.max_prompt_length,
        kl_coef=settings.kl_coef if kl_control else 0.0,
        adaptive_kl_target=settings.adaptive_kl_target if kl_control else None,
        measure_kl=True,  # a run without KL control reports its KL too
        seed=seed,
        save_every=0,
        precision=compute_precision(),
        **algorithm_overrides(algo, settings.steps),
    )


def end_ids_of(source: str, model: str | None = None) -> list[int]:
    """The ids that end the model's turn (its tokenizer's EOS and its generation config's), after checking it has a
    chat template: the task is asked as a chat. `model` is the name the user gave, for the message."""
    from transformers import GenerationConfig

    from fastppo.engines.hf import end_token_ids
    from fastppo.models import load_tokenizer
    from fastppo.runtime.errors import InputError

    tokenizer = load_tokenizer(source)
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(f"--model {model or source}: its tokenizer has no chat template; the task is asked as a chat")
    has_generation_config = os.path.isfile(f"{source}/generation_config.json")
    generation = GenerationConfig.from_pretrained(source) if has_generation_config else None
    return end_token_ids(tokenizer, None, tuple(_as_list(getattr(generation, "eos_token_id", None))))


def verifier_rewards(end_ids) -> list:
    """The verifier, as TRL reward functions: the right last number, and 0.2 for a short answer that ends its turn."""
    return [arithmetic.correctness, arithmetic.short_and_ended(end_ids)]


def compute_precision() -> str:
    """bf16 autocast where the CPU multiplies bf16 natively (AMX, AVX512-BF16: `fastppo doctor`), else float32:
    the budget of FULL is sized by the matmuls of training, which bf16 speeds up there and slows down elsewhere."""
    import torch

    from fastppo.runtime.precision import cpu_multiplies_bf16

    return "bf16" if torch.cuda.is_available() or cpu_multiplies_bf16() else "float32"


def evaluate(trainer, rows: list[dict]) -> dict:
    """Greedy answers to `rows`, their accuracy (the last number, as GSM8K's graders read it) and length."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(EVALUATE_SEED)
        responses = trainer.generate([conversation(r)["prompt"] for r in rows], temperature=0.0)
    correct = arithmetic.correctness(responses, [r["answer"] for r in rows])
    return {
        "accuracy": statistics.fmean(correct),
        "words": statistics.fmean(len(r.split()) for r in responses),
        "responses": responses,
    }


def save_final(trainer, directory: str) -> None:
    """The trained policy alone, as `from_pretrained` reads it: the trainer's model-only export where it has one,
    else its checkpoint's model files."""
    if hasattr(trainer, "save_model"):
        trainer.save_model(directory)
        return
    import shutil

    checkpoint = trainer.save()
    shutil.copytree(checkpoint, directory, ignore=shutil.ignore_patterns("trainer_state*", "master_weights*", "*.pt"))


def summary_text(summary: dict) -> str:
    before, after = summary["before"], summary["after"]
    minutes = summary["seconds"]["total"] / 60
    return (
        f"{summary['model']}, {summary['algo']}, seed {summary['seed']}: held-out accuracy {before['accuracy']:.3f} -> "
        f"{after['accuracy']:.3f}, answers {before['words']:.1f} -> {after['words']:.1f} words, KL "
        f"{summary['kl']:.2f} nats; {minutes:.1f} min. Policy in {summary['final']}"
    )


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]
