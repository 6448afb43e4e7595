"""`fastppo demo --model M --proxy`: the seed's lesson on real weights. A learned reward is a proxy; optimized hard
enough without a KL leash, it stops tracking what it stood for.

1. Pairs: the released model answers training problems twice each (temperature 1); a labeller prefers the answer the
   verifier (`arithmetic.py`: the right last number, a short answer that ends its turn) scores higher, and, when the
   verifier scores both the same (most pairs: the model is mostly wrong), the longer one: the length bias human
   preference labels are known for, and the realistic flaw of this reward model. There are few pairs, too.
2. Reward model: `fastppo reward-model`'s training (Bradley-Terry) on those pairs, from the released model itself.
3. RL twice from the released model against that reward model, as the proxy: with the adaptive KL penalty, then
   without one. The verifier, the gold, rides along at weight 0 (`reward_weights`): logged on every rollout
   (`rewards/correctness/mean`), never optimized.
4. Every `eval_every` steps both arms answer held-out problems greedily; proxy and gold are scored on the same
   answers. curves.png puts proxy and gold of both arms over the steps in one figure; summary.json holds the rows.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import statistics
import time

from fastppo.demo import arithmetic
from fastppo.demo.pipeline import write_jsonl
from fastppo.demo.released import (
    DEFAULT_ALGO,
    EVALUATE_SEED,
    ReleasedSettings,
    conversation,
    end_ids_of,
    ppo_config,
    verifier_rewards,
)


@dataclasses.dataclass(frozen=True)
class LessonSettings(ReleasedSettings):
    """The lesson's budget: the released demo's settings for each RL arm (fewer steps, a faster learning rate, a
    smaller held-out set scored every `eval_every` steps) and the pairs and reward model before them. FULL is sized
    for 2 CPU cores (docs/demo-results.md has its timing); QUICK is the plumbing check the tests run on tiny models."""

    pair_problems: int = 192  # two answers each: few pairs, the other flaw
    pair_temperature: float = 1.0
    reward_epochs: float = 1.0
    reward_learning_rate: float = 2e-5
    reward_batch_size: int = 8
    steps: int = 30
    learning_rate: float = 2e-5
    eval_every: int = 5
    held_out: int = 64


FULL = LessonSettings()
QUICK = LessonSettings(
    pair_problems=6,
    reward_batch_size=4,
    steps=2,
    rollout_batch_size=4,
    mini_batch_size=4,
    max_new_tokens=8,
    eval_every=1,
    held_out=4,
)


def run(args) -> int:
    from fastppo.runtime.errors import InputError
    from fastppo.runtime.validation import refuse_non_empty_dir

    if args.no_kl_control:
        raise InputError("--proxy runs both arms, with and without KL control: drop --no-kl-control")
    output_dir = args.output_dir or os.path.join("runs", time.strftime("demo-proxy-%Y%m%d-%H%M%S"))
    refuse_non_empty_dir("--output-dir", output_dir)
    settings = QUICK if args.quick else FULL
    summary = run_lesson(args.model, output_dir, settings, seed=args.seed or 0, algo=args.algo or DEFAULT_ALGO)
    print(summary_text(summary))
    return 0


def run_lesson(model: str, output_dir: str, settings: LessonSettings, seed: int, algo: str) -> dict:
    from fastppo.runtime.model_sources import resolve

    start = time.perf_counter()
    os.makedirs(output_dir, exist_ok=True)
    source = resolve(model, "--model")
    end_ids = end_ids_of(source, model)
    train_rows, held_out = arithmetic.split(seed, n_held_out=settings.held_out)
    seconds = {}

    print(f"fastppo demo --proxy: {model}, [1/3] preference pairs labelled by the verifier, with a length bias")
    pairs, agreement = label_pairs(source, train_rows[: settings.pair_problems], settings, seed, end_ids, output_dir)
    write_jsonl(os.path.join(output_dir, "data", "preferences.jsonl"), pairs)
    seconds["pairs"] = time.perf_counter() - start

    print(f"[2/3] reward model from {model} (Bradley-Terry, {len(pairs)} pairs)")
    mark = time.perf_counter()
    reward_model = train_proxy(source, pairs, settings, seed, os.path.join(output_dir, "reward_model"))
    seconds["reward_model"] = time.perf_counter() - mark

    arms = {}
    for kl_control in (True, False):
        name = "kl" if kl_control else "no_kl"
        label = f"adaptive KL control, target {settings.adaptive_kl_target} nats" if kl_control else "NO KL control"
        print(f"[3/3] RL ({algo}) against the reward model, {label}")
        mark = time.perf_counter()
        arms[name] = rl_arm(
            source, reward_model["path"], train_rows, held_out, settings, seed, algo, kl_control, end_ids, output_dir
        )
        seconds[f"rl_{name}"] = time.perf_counter() - mark
    seconds["total"] = time.perf_counter() - start

    summary = {
        "model": model,
        "algo": algo,
        "seed": seed,
        "settings": dataclasses.asdict(settings),
        "pairs": {"count": len(pairs), "agree_with_verifier": agreement},
        "reward_model": {k: v for k, v in reward_model.items() if k != "stop"},
        "arms": arms,
        "seconds": seconds,
        "output_dir": output_dir,
    }
    with open(os.path.join(output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    plot_lesson(summary, os.path.join(output_dir, "curves.png"))
    return summary


# ----------------------------------------------------------------------------------------------
# 1-2. the flawed preference labels and the proxy reward model
# ----------------------------------------------------------------------------------------------


def label_pairs(source, rows, settings, seed, end_ids, output_dir) -> tuple[list[dict], float]:
    """Two sampled answers to each of `rows`, labelled: the verifier's higher score wins; on a tie the longer answer
    does (ties of identical answers are dropped). Returns (pairs, the fraction of labels the verifier alone would
    also give: the pairs it does not tie on)."""
    import torch

    sampler = make_trainer(source, rows, settings, seed, False, output_dir, "sampler", end_ids=end_ids)
    prompts = [conversation(r)["prompt"] for r in rows for _ in range(2)]
    answers = [r["answer"] for r in rows for _ in range(2)]
    texts, responses, golds = [], [], []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(0, len(prompts), settings.rollout_batch_size):
            batch = sampler.rollout(prompts[i : i + settings.rollout_batch_size], settings.pair_temperature)
            texts += [str(p) for p in batch.prompts]  # rendered with the chat template, as PPO's rollouts hold them
            responses += batch.responses
            golds += gold_scores(batch, answers[i : i + settings.rollout_batch_size], end_ids)
    del sampler
    pairs, decided_by_gold = [], 0
    for k in range(len(rows)):
        (a, b), (gold_a, gold_b) = responses[2 * k : 2 * k + 2], golds[2 * k : 2 * k + 2]
        if a == b:
            continue
        if gold_a != gold_b:
            decided_by_gold += 1
            first_wins = gold_a > gold_b
        else:
            first_wins = len(a) >= len(b)
        chosen, rejected = (a, b) if first_wins else (b, a)
        pairs.append({"prompt": texts[2 * k], "chosen": chosen, "rejected": rejected})
    random.Random(seed).shuffle(pairs)
    return pairs, decided_by_gold / max(1, len(pairs))


def train_proxy(source, pairs, settings, seed, directory) -> dict:
    """`fastppo reward-model` on `pairs`, from `source`: the proxy, saved to `directory`."""
    import torch

    from fastppo.demo.pipeline import quiet_load
    from fastppo.models import load_tokenizer
    from fastppo.stages.reward_model import load_reward_model, train_reward_model

    tokenizer = load_tokenizer(source, need_eos=True)
    torch.manual_seed(seed)  # the new score head is drawn as the model loads
    result = train_reward_model(
        quiet_load(load_reward_model, source, tokenizer),
        tokenizer,
        pairs,
        epochs=settings.reward_epochs,
        batch_size=settings.reward_batch_size,
        learning_rate=settings.reward_learning_rate,
        max_length=settings.max_prompt_length + settings.max_new_tokens + 1,
        eval_fraction=0.1,
        seed=seed,
        output_dir=directory,
        log=lambda line: print("  " + line),
    )
    print(f"  held-out pairwise accuracy {result['eval_accuracy']:.3f} (on the labeller's own, biased labels)")
    return result | {"path": directory}


# ----------------------------------------------------------------------------------------------
# 3-4. the RL arms, evaluated by proxy and gold
# ----------------------------------------------------------------------------------------------


def make_trainer(
    source, rows, settings, seed, kl_control, output_dir, name, *, end_ids, reward_model=None, algo=DEFAULT_ALGO
):
    """A trainer from `source` whose reward is `reward_model` (the verifier's functions at weight 0 beside it, logged
    only); without a reward model, the verifier alone (the pair sampler, which never trains)."""
    from fastppo.ppo.trainer import PPOTrainer

    gold = verifier_rewards(end_ids)
    rewards = gold if reward_model is None else [reward_model, *gold]
    weights = None if reward_model is None else [1.0] + [0.0] * len(gold)
    config = ppo_config(source, settings, rewards, os.path.join(output_dir, name), seed, algo, kl_control, weights)
    return PPOTrainer(config, prompts=[conversation(r) for r in rows])


def rl_arm(source, reward_path, rows, held_out, settings, seed, algo, kl_control, end_ids, output_dir) -> dict:
    name = "ppo_kl" if kl_control else "ppo_no_kl"
    trainer = make_trainer(
        source, rows, settings, seed, kl_control, output_dir, name, end_ids=end_ids, reward_model=reward_path, algo=algo
    )
    proxy, proxy_name = trainer.reward.rewards[0], trainer.reward.names[0]

    def evaluate(step: int, recent: list[dict]) -> dict:
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(EVALUATE_SEED)
            batch = trainer.rollout([conversation(r)["prompt"] for r in held_out], temperature=0.0)
        row = {
            "step": step,
            "proxy": float(proxy(batch).float().mean()),
            "gold": statistics.fmean(gold_scores(batch, [r["answer"] for r in held_out], end_ids)),
            "accuracy": statistics.fmean(arithmetic.correctness(batch.responses, [r["answer"] for r in held_out])),
            "words": statistics.fmean(len(r.split()) for r in batch.responses),
            "kl": statistics.fmean(m["policy/kl"] for m in recent) if recent else 0.0,
        }
        print(
            f"  step {step:3d}  proxy {row['proxy']:+.2f}  gold {row['gold']:.3f}  accuracy {row['accuracy']:.3f}"
            f"  {row['words']:.1f} words  KL {row['kl']:.2f}"
        )
        return row

    history, evals = [], [evaluate(0, [])]
    for step in range(1, settings.steps + 1):
        history.append(trainer.step())
        if step % settings.eval_every == 0 or step == settings.steps:
            evals.append(evaluate(step, history[-settings.eval_every :]))
    return {
        "kl_control": kl_control,
        "eval": evals,
        "train": [
            {
                "step": i + 1,
                "proxy": m[f"rewards/{proxy_name}/mean"],
                "gold_correctness": m.get("rewards/correctness/mean"),
                "kl": m.get("policy/kl"),
                "length": m.get("rollout/response_length_mean"),
            }
            for i, m in enumerate(history)
        ],
    }


def gold_scores(batch, answers, end_ids) -> list[float]:
    """The verifier's score of each response of `batch`: the sum of `verifier_rewards`, called as PPO calls them."""
    ids = [row[mask].tolist() for row, mask in zip(batch.response_ids, batch.response_mask.bool(), strict=True)]
    rewards = verifier_rewards(end_ids)
    columns = [fn(completions=batch.responses, completion_ids=ids, answer=answers) for fn in rewards]
    return [sum(scores) for scores in zip(*columns, strict=True)]


# ----------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------


def plot_lesson(summary: dict, path: str) -> None:
    """Proxy and gold of both arms over the held-out evaluations, with KL and length, in one 2x2 figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    panels = (("proxy", "proxy reward (the learned reward model)"), ("gold", "gold (the verifier)"))
    panels += (("kl", "KL to the released model (nats per answer)"), ("words", "held-out answer length (words)"))
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        for arm in summary["arms"].values():
            style = {"color": "tab:blue", "label": "with KL control"}
            if not arm["kl_control"]:
                style = {"color": "tab:red", "label": "without KL control"}
            ax.plot([r["step"] for r in arm["eval"]], [r[key] for r in arm["eval"]], "o-", **style)
        ax.set_title(title)
        ax.legend(loc="best", fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("RL step")
    fig.suptitle(f"fastppo demo --proxy: {summary['model']}, {summary['algo']}, seed {summary['seed']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary_text(summary: dict) -> str:
    lines = [f"{summary['model']}, proxy reward model ({summary['pairs']['count']} pairs), {summary['algo']}:"]
    for arm in summary["arms"].values():
        first, last = arm["eval"][0], arm["eval"][-1]
        lines.append(
            f"  {'with' if arm['kl_control'] else 'without'} KL control: proxy {first['proxy']:+.2f} -> "
            f"{last['proxy']:+.2f}, gold {first['gold']:.3f} -> {last['gold']:.3f}, {first['words']:.1f} -> "
            f"{last['words']:.1f} words, KL {last['kl']:.2f}"
        )
    lines.append(f"{summary['seconds']['total'] / 60:.1f} min; curves in {summary['output_dir']}/curves.png")
    return "\n".join(lines)
