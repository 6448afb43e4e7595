"""`fastppo demo` (also `fastppo train` with no config): the whole classical RLHF pipeline, offline, in minutes.

1. SFT: a tiny Llama (built from a config) learns a generated corpus of answers (`task.py`).
2. Reward modelling: a sequence classifier initialised from the SFT model learns, with the Bradley-Terry loss,
   preference pairs labelled by the hidden gold function.
3. PPO: the SFT policy is optimized against the learned reward model, with KL control toward the SFT model.
4. Evaluation: every few steps the policy answers held-out prompts and the answers are scored by the proxy (the
   reward model) and by gold, the external check that a proxy reward always needs.

`--no-kl-control` runs step 3 with no KL penalty: the proxy keeps rising while gold collapses and answers grow
to the length limit, the over-optimization PPO's KL term exists to prevent.

`--algo` picks the advantage estimator of step 3 (`ALGORITHMS`): PPO's GAE (the default), VAPO's value-based preset,
or a critic-free one. Every algorithm gets the same budget (steps x sequences per step x max_new_tokens generated
tokens) and the same adaptive KL penalty in the reward, so their gold rewards compare at equal cost and KL.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time

from fastppo.demo import report, task
from fastppo.runtime import run_lock
from fastppo.runtime.validation import refuse_non_empty_dir

EVALUATE_SEED = 1234  # the same sampling seed at every evaluation, so curves differ by the policy, not the dice


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every knob of the demo. FULL is the default run (< 5 min on 2 CPU cores); QUICK the CI run (< 1 min)."""

    sft_examples: int = 8000
    sft_epochs: float = 5.0
    sft_learning_rate: float = 6e-3
    reward_pairs: int = 6000
    reward_epochs: float = 3.0
    reward_learning_rate: float = 1e-3
    ppo_steps: int = 100
    rollout_batch_size: int = 64
    mini_batch_size: int = 16
    ppo_epochs: int = 4
    ppo_learning_rate: float = 3e-4
    kl_coef: float = 0.05
    adaptive_kl_target: float = 4.0  # nats per answer: enough to reach three good clauses, far from gibberish
    kl_horizon: int = 2000
    max_new_tokens: int = 32  # twice the length gold starts to penalize, so length blow-up is visible
    eval_every: int = 10
    eval_samples_per_prompt: int = 4


# `--algo`: the PPOConfig fields each algorithm sets on top of the demo's. The group estimators sample each prompt
# GROUP times, so a step holds rollout_batch_size / GROUP prompts: the same sequences, the same tokens.
GROUP = 4
ALGORITHMS = {
    "gae": {},
    # VAPO (arXiv 2504.05118): decoupled GAE, length-adaptive lambda (alpha 0.05), critic warm-up (below), and, as
    # VAPO has, a critic of its own: with a shared backbone the warm-up could train the value head alone.
    "vapo": {"critic_lam": 1.0, "lam_length_alpha": 0.05, "critic": "separate"},
    "grpo": {"advantage_estimator": "grpo", "samples_per_prompt": GROUP},
    "dr_grpo": {"advantage_estimator": "dr_grpo", "samples_per_prompt": GROUP},
    "rloo": {"advantage_estimator": "rloo", "samples_per_prompt": GROUP},
    "reinforce++": {"advantage_estimator": "reinforce++"},
    "reinforce++-baseline": {"advantage_estimator": "reinforce++-baseline", "samples_per_prompt": GROUP},
}


def algorithm_overrides(algo: str, steps: int) -> dict:
    """The PPOConfig fields of `algo` for a run of `steps` PPO steps (VAPO warms its critic up for 1/20 of them)."""
    overrides = dict(ALGORITHMS[algo])
    if algo == "vapo":
        overrides["value_warmup_steps"] = max(1, steps // 20)
    return overrides


FULL = Settings()
QUICK = Settings(
    sft_examples=4000,
    sft_epochs=4.0,
    reward_pairs=3000,
    reward_epochs=2.0,
    ppo_steps=30,
    eval_every=5,
    eval_samples_per_prompt=2,
)


# ----------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------


DEMO_FLAGS = ("quick", "no_kl_control", "algo", "model", "proxy")  # the demo's own; --seed and --output-dir are shared


def add_arguments(parser) -> None:
    add_demo_arguments(parser)
    parser.add_argument("--output-dir", help="run directory (default: runs/demo-<timestamp>)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the corpus, the models and PPO (default 0)")


def add_demo_arguments(parser) -> None:
    """The flags only the demo has (`fastppo train` adds them beside PPOConfig's own --seed and --output-dir)."""
    parser.add_argument("--quick", action="store_true", help="a smaller run (under a minute) for tests and CI")
    parser.add_argument(
        "--no-kl-control",
        action="store_true",
        help="PPO with no KL penalty, to watch the policy over-optimize the proxy reward",
    )
    parser.add_argument(
        "--algo",
        choices=list(ALGORITHMS),
        default=None,
        help="advantage estimator of the RL stage: gae (PPO, the default), vapo, or a critic-free one",
    )
    parser.add_argument(
        "--model",
        help="a released chat model instead of the generated task's tiny one: smollm2-135m-instruct, a local "
        "instruct checkpoint or a GGUF file, trained by PPO on arithmetic with a verifier's reward (demo/released.py)",
    )
    parser.add_argument(
        "--proxy",
        action="store_true",
        help="with --model: train a reward model from it on length-biased, verifier-labelled pairs and optimize that "
        "proxy with and without KL control, the verifier as gold (demo/released_proxy.py)",
    )


def run(args) -> int:
    if getattr(args, "model", None):
        from fastppo.demo import released

        return released.run(args)
    if getattr(args, "proxy", False):
        from fastppo.runtime.errors import InputError

        raise InputError("--proxy needs --model: the built-in demo always optimizes a learned reward model")
    quick, no_kl = bool(getattr(args, "quick", False)), bool(getattr(args, "no_kl_control", False))
    algo = getattr(args, "algo", None) or "gae"
    output_dir = getattr(args, "output_dir", None) or default_output_dir(no_kl, algo)
    refuse_non_empty_dir("--output-dir", output_dir)  # its SFT and reward models would be retrained over
    run_lock.hold(output_dir, "demo")  # one run per directory (a second demo started meanwhile); ends with the command
    summary = run_pipeline(
        output_dir, QUICK if quick else FULL, kl_control=not no_kl, seed=getattr(args, "seed", None) or 0, algo=algo
    )
    print(report.summary_text(summary))
    return 0


def default_output_dir(no_kl: bool, algo: str = "gae") -> str:
    suffix = ("" if algo == "gae" else f"-{algo}") + ("-no-kl" if no_kl else "")
    return os.path.join("runs", time.strftime("demo-%Y%m%d-%H%M%S") + suffix)


# ----------------------------------------------------------------------------------------------
# the pipeline
# ----------------------------------------------------------------------------------------------


def run_pipeline(
    output_dir: str, settings: Settings, kl_control: bool = True, seed: int = 0, algo: str = "gae"
) -> dict:
    """Run the four stages into `output_dir`; write the plot and report; return the summary the report shows."""
    from transformers.utils import logging

    logging.disable_progress_bar()  # the stage logs say what is happening; per-file bars would drown them
    os.makedirs(output_dir, exist_ok=True)
    print(f"fastppo demo: classical RLHF on a generated task, run directory {output_dir}")
    seconds: dict[str, float] = {}
    summary: dict = {"output_dir": output_dir, "settings": dataclasses.asdict(settings), "seed": seed}
    summary["kl_control"], summary["algo"] = kl_control, algo

    start = time.perf_counter()
    print("[1/4] supervised fine-tuning of a tiny Llama on the generated corpus")
    summary["sft"] = train_sft_stage(output_dir, settings, seed)
    seconds["sft"] = time.perf_counter() - start

    start = time.perf_counter()
    print("[2/4] reward model: Bradley-Terry on preference pairs labelled by the hidden gold function")
    summary["reward_model"] = train_reward_stage(output_dir, settings, seed)
    seconds["reward_model"] = time.perf_counter() - start

    start = time.perf_counter()
    kl_text = f"adaptive KL control, target {settings.adaptive_kl_target} nats" if kl_control else "NO KL control"
    print(f"[3/4] RL ({algo}) against the reward model ({kl_text}); [4/4] gold evaluation on held-out prompts")
    summary.update(ppo_stage(output_dir, settings, kl_control, seed, algo))
    seconds["ppo_and_evaluation"] = time.perf_counter() - start

    summary["seconds"] = seconds
    with open(os.path.join(output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    report.plot_curves(summary, os.path.join(output_dir, "curves.png"))
    report.write_report(summary, os.path.join(output_dir, "report.md"))
    return summary


def build_policy(tokenizer, seed: int):
    """A 2-layer, 64-wide Llama over the task's word vocabulary: small enough to train in seconds on a CPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def train_sft_stage(output_dir: str, settings: Settings, seed: int) -> dict:
    from fastppo.demo.tokenizer import build_tokenizer
    from fastppo.stages.sft import train_sft

    tokenizer = build_tokenizer()
    corpus = task.sft_corpus(settings.sft_examples, seed=seed)
    write_jsonl(os.path.join(output_dir, "data", "sft.jsonl"), corpus)
    result = train_sft(
        build_policy(tokenizer, seed),
        tokenizer,
        corpus,
        epochs=settings.sft_epochs,
        batch_size=32,
        learning_rate=settings.sft_learning_rate,
        max_length=64,
        seed=seed,
        output_dir=os.path.join(output_dir, "sft"),
        log=lambda line: print("  " + line),
    )
    result["corpus_gold"] = statistics.fmean(task.gold_reward(r["prompt"], r["response"]) for r in corpus)
    return result


def train_reward_stage(output_dir: str, settings: Settings, seed: int) -> dict:
    from fastppo.models import load_tokenizer
    from fastppo.stages.reward_model import load_reward_model, train_reward_model

    sft_dir = os.path.join(output_dir, "sft")
    pairs = task.preference_pairs(settings.reward_pairs, seed=seed + 1)
    write_jsonl(os.path.join(output_dir, "data", "preferences.jsonl"), pairs)
    tokenizer = load_tokenizer(sft_dir, need_eos=True)
    result = train_reward_model(
        quiet_load(load_reward_model, sft_dir, tokenizer),
        tokenizer,
        pairs,
        epochs=settings.reward_epochs,
        batch_size=32,
        learning_rate=settings.reward_learning_rate,
        max_length=64,
        eval_fraction=0.1,
        seed=seed,
        output_dir=os.path.join(output_dir, "reward_model"),
        log=lambda line: print("  " + line),
    )
    print(f"  held-out pairwise accuracy {result['eval_accuracy']:.3f}")
    return result


def ppo_config(output_dir: str, settings: Settings, kl_control: bool, seed: int, algo: str = "gae", name: str = "ppo"):
    """The RL stage's PPOConfig; the trainer writes into `output_dir`/`name` (`fastppo compare` runs several)."""
    from fastppo.ppo.config import PPOConfig

    config = PPOConfig(
        policy_model=os.path.join(output_dir, "sft"),
        reward_model=os.path.join(output_dir, "reward_model"),
        prompts=task.prompts()[0],
        output_dir=os.path.join(output_dir, name),
        steps=settings.ppo_steps,
        rollout_batch_size=settings.rollout_batch_size,
        mini_batch_size=settings.mini_batch_size,
        ppo_epochs=settings.ppo_epochs,
        max_new_tokens=settings.max_new_tokens,
        learning_rate=settings.ppo_learning_rate,
        kl_coef=settings.kl_coef if kl_control else 0.0,
        adaptive_kl_target=settings.adaptive_kl_target if kl_control else None,
        kl_horizon=settings.kl_horizon,
        measure_kl=True,  # the demo reports the KL of every run, those without KL control included
        seed=seed,
        **algorithm_overrides(algo, settings.ppo_steps),
    )
    config.validate()
    return config


def ppo_stage(
    output_dir: str, settings: Settings, kl_control: bool, seed: int, algo: str = "gae", name: str = "ppo"
) -> dict:
    """Drive the PPO loop step by step, evaluating the policy on held-out prompts every `eval_every` steps."""
    from fastppo.models import load_tokenizer
    from fastppo.ppo.trainer import PPOTrainer
    from fastppo.stages.reward_model import load_reward_model

    config = ppo_config(output_dir, settings, kl_control, seed, algo, name)
    trainer = PPOTrainer(config)
    tokenizer = load_tokenizer(config.reward_model, need_eos=True)
    proxy = quiet_load(load_reward_model, config.reward_model, tokenizer)
    heldout = task.prompts()[1]
    eval_prompts = [p for p in heldout for _ in range(settings.eval_samples_per_prompt)]

    def evaluate(step: int, train_metrics: dict) -> tuple[dict, list[str]]:
        responses = generate(trainer, eval_prompts, seed=EVALUATE_SEED)
        row = evaluation_row(step, eval_prompts, responses, proxy, tokenizer, train_metrics)
        print(
            f"  step {step:4d}  gold {row['gold']:+.2f}  proxy {row['proxy']:+.2f}  KL {row['kl']:.2f}"
            f"  length {row['length']:.1f} words"
        )
        return row, responses

    train_rows: list[dict] = []
    first_row, sft_responses = evaluate(0, {})
    eval_rows = [first_row]
    for step in range(1, settings.ppo_steps + 1):
        train_rows.append(trainer.step())
        if step % settings.eval_every == 0 or step == settings.ppo_steps:
            row, responses = evaluate(step, recent_mean(train_rows, settings.eval_every))
            eval_rows.append(row)
    trainer.save()
    write_jsonl(os.path.join(output_dir, "eval.jsonl" if name == "ppo" else f"eval-{name}.jsonl"), eval_rows)
    return {
        "train": train_rows,
        "eval": eval_rows,
        "samples": sample_table(eval_prompts, sft_responses, responses, settings.eval_samples_per_prompt),
        "metrics_path": os.path.join(config.output_dir, "metrics.jsonl"),
    }


def generate(trainer, prompts: list[str], seed: int) -> list[str]:
    """The trainer's sampled answers, under a fixed seed that leaves the training RNG where it was."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return trainer.generate(prompts)


def evaluation_row(step: int, prompts, responses, proxy, tokenizer, train_metrics: dict) -> dict:
    from fastppo.stages.reward_model import score

    return {
        "step": step,
        "gold": statistics.fmean(task.gold_rewards(prompts, responses)),
        "proxy": statistics.fmean(score(proxy, tokenizer, prompts, responses)),
        "length": statistics.fmean(len(r.split()) for r in responses),
        # KL is measured by the trainer on its rollouts (the same policy, train prompts); 0 before any update.
        "kl": train_metrics.get("policy/kl", 0.0),
        "kl_coef": train_metrics.get("kl/coef", 0.0),
    }


def recent_mean(rows: list[dict], n: int) -> dict:
    recent = rows[-n:]
    return {k: statistics.fmean(r[k] for r in recent) for k in recent[-1] if isinstance(recent[-1][k], (int, float))}


def sample_table(prompts, before, after, per_prompt: int, n: int = 6) -> list[dict]:
    """The first answer to each of the first `n` held-out prompts, before and after PPO, with their gold scores."""
    rows = []
    for i in range(0, min(len(prompts), n * per_prompt), per_prompt):
        p = prompts[i]
        rows.append(
            {
                "prompt": p,
                "sft": before[i],
                "sft_gold": task.gold_reward(p, before[i]),
                "ppo": after[i],
                "ppo_gold": task.gold_reward(p, after[i]),
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------


def write_jsonl(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def quiet_load(load, *args):
    """`load(*args)` without transformers' report that the new score head is newly initialised (it is meant to)."""
    from transformers.utils import logging

    previous = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return load(*args)
    finally:
        logging.set_verbosity(previous)
