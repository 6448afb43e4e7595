"""`fastppo compare`: PPO against the critic-free estimators, DPO and best-of-n, measured on the demo task.

The shared stages run once: the SFT model, the preference pairs and the Bradley-Terry reward model (`pipeline.py`).
Then every method starts from that SFT model, one after another in this process:

- online, against the same learned reward model, with the same budget (steps x sequences x max_new_tokens) and the
  same adaptive KL penalty: PPO (GAE, shared critic), the VAPO preset, GRPO, RLOO, REINFORCE++;
- the reward-hacking row: PPO with KL control off;
- offline: DPO on the very pairs the reward model learned from (`dpo_stage.py`);
- inference time: best-of-n sampling from the SFT policy, ranked by the reward model.

Each row: gold and proxy reward on the held-out prompts, KL to the SFT policy, answer length, wall time and peak
memory (the process's resident set, sampled every 50 ms while the method runs, above its size when it started).
KL is measured where each method defines it: the trainer's estimate on its last rollouts for the online methods, the
sampled sequence log-ratio on the held-out answers for DPO, and log n - (n - 1) / n, the standard analytic bound, for
best-of-n. Outputs in the run directory: `compare.md`, `compare.png`, `compare.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import threading
import time

from fastppo.demo import compare_report, pipeline, task
from fastppo.demo.dpo_stage import DPOSettings, run_dpo_on_demo
from fastppo.runtime import run_lock
from fastppo.runtime.validation import refuse_non_empty_dir

# The full comparison (<= 15 min on 2 CPU cores): the demo's SFT and reward model, then half the demo's RL budget per
# method, so that six RL runs, DPO and best-of-n fit; evaluations every 10 steps trace each method's gold-KL path.
FULL = dataclasses.replace(pipeline.FULL, ppo_steps=50, eval_every=10)
FULL_DPO = DPOSettings()
# `--quick` (<= 2 min, for tests): every row, tiny budgets; the numbers say nothing.
QUICK = dataclasses.replace(
    pipeline.QUICK,
    sft_examples=2000,
    sft_epochs=2.0,
    reward_pairs=1000,
    reward_epochs=1.0,
    ppo_steps=4,
    rollout_batch_size=16,
    mini_batch_size=8,
    ppo_epochs=1,
    eval_every=2,
    eval_samples_per_prompt=1,
)
QUICK_DPO = DPOSettings(epochs=0.5, eval_samples_per_prompt=1)
BEST_OF_N = 8

# (row name, --algo, KL control) of the online rows, the reward-hacking row last.
ONLINE = [
    ("PPO (GAE)", "gae", True),
    ("VAPO", "vapo", True),
    ("GRPO", "grpo", True),
    ("RLOO", "rloo", True),
    ("REINFORCE++", "reinforce++", True),
    ("PPO, no KL control", "gae", False),
]


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny budgets (under 2 minutes) for tests and CI")
    parser.add_argument("--best-of", type=int, default=BEST_OF_N, help=f"n of best-of-n (default {BEST_OF_N})")
    parser.add_argument("--output-dir", help="run directory (default: runs/compare-<timestamp>)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the models and every method")


def run(args) -> int:
    from fastppo.runtime.errors import InputError

    if args.best_of < 1:
        raise InputError(f"--best-of must be at least 1, got {args.best_of}")
    output_dir = args.output_dir or os.path.join("runs", time.strftime("compare-%Y%m%d-%H%M%S"))
    refuse_non_empty_dir("--output-dir", output_dir)
    run_lock.hold(output_dir, "compare")  # one run per directory; released when the command ends
    settings, dpo_settings = (QUICK, QUICK_DPO) if args.quick else (FULL, FULL_DPO)
    summary = run_comparison(output_dir, settings, dpo_settings, args.best_of, args.seed)
    print(compare_report.summary_text(summary))
    return 0


def run_comparison(output_dir: str, settings, dpo_settings: DPOSettings, best_of: int, seed: int = 0) -> dict:
    """Build the shared stages once, run every method, write the table, the plot and the JSON; return the summary."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    os.makedirs(output_dir, exist_ok=True)
    print(f"fastppo compare: every method from one SFT model and one reward model, run directory {output_dir}")
    start = time.perf_counter()
    print("[shared] supervised fine-tuning")
    pipeline.train_sft_stage(output_dir, settings, seed)
    print("[shared] reward model on the preference pairs")
    reward = pipeline.train_reward_stage(output_dir, settings, seed)
    shared_seconds = time.perf_counter() - start
    pairs = task.preference_pairs(settings.reward_pairs, seed=seed + 1)  # the reward model's pairs, for DPO

    rows, curves = [], {}
    for name, algo, kl_control in ONLINE:
        print(f"[{len(rows) + 1}/{len(ONLINE) + 2}] {name}")
        stage = functools.partial(pipeline.ppo_stage, output_dir, settings, kl_control, seed, algo, run_name(name))
        result, seconds, peak = measured(stage)
        rows.append(online_row(name, result, settings, seconds, peak))
        curves[name] = [(r["kl"], r["gold"]) for r in result["eval"]]
    print(f"[{len(rows) + 1}/{len(ONLINE) + 2}] DPO on the reward model's preference pairs")
    dpo, seconds, peak = measured(
        lambda: run_dpo_on_demo(
            os.path.join(output_dir, "dpo"),
            os.path.join(output_dir, "sft"),
            pairs,
            dpo_settings,
            seed,
            log=lambda line: print(line),
        )
    )
    sft_row, dpo_row = offline_rows(output_dir, dpo, seconds, peak)
    print(f"[{len(rows) + 2}/{len(ONLINE) + 2}] best-of-{best_of} sampling from the SFT policy")
    best, seconds, peak = measured(lambda: best_of_n(output_dir, settings, best_of, seed))
    rows = [sft_row, *rows, dpo_row, {**best, "seconds": seconds, "peak_mb": peak}]
    summary = {
        "output_dir": output_dir,
        "settings": dataclasses.asdict(settings),
        "seed": seed,
        "dpo_settings": dataclasses.asdict(dpo_settings),
        "best_of": best_of,
        "rows": rows,
        "curves": curves,
        "shared_seconds": shared_seconds,
        "reward_model_accuracy": reward["eval_accuracy"],
    }
    with open(os.path.join(output_dir, "compare.json"), "w") as f:
        json.dump(summary, f, indent=2)
    compare_report.write_table(summary, os.path.join(output_dir, "compare.md"))
    compare_report.plot(summary, os.path.join(output_dir, "compare.png"))
    return summary


def run_name(name: str) -> str:
    """A directory name for a row: "PPO, no KL control" -> "ppo-no-kl-control"."""
    return "-".join("".join(c if c.isalnum() or c == "+" else " " for c in name.lower()).split())


def online_row(name: str, result: dict, settings, seconds: float, peak_mb: float) -> dict:
    last = result["eval"][-1]
    kl = pipeline.recent_mean(result["train"], 10)["policy/kl"]  # the trainer's estimate on its last 10 batches
    return {
        "method": name,
        "kind": "online",
        "gold": last["gold"],
        "proxy": last["proxy"],
        "kl": kl,
        "length": last["length"],
        "seconds": seconds,
        "peak_mb": peak_mb,
    }


def offline_rows(output_dir: str, dpo: dict, seconds: float, peak_mb: float) -> tuple[dict, dict]:
    """The SFT policy's row (DPO's "before" answers) and DPO's row, both scored by the proxy as well."""
    proxy = proxy_scorer(output_dir)
    prompts = dpo["eval_prompts"]
    sft, after = dpo["sft"], dpo["dpo"]
    sft_row = {
        "method": "SFT policy",
        "kind": "start",
        "gold": sft["gold"],
        "proxy": proxy(prompts, sft["responses"]),
        "kl": 0.0,
        "length": sft["length"],
        "seconds": 0.0,
        "peak_mb": 0.0,
    }
    dpo_row = {
        "method": "DPO",
        "kind": "offline",
        "gold": after["gold"],
        "proxy": proxy(prompts, after["responses"]),
        "kl": after["kl"],
        "length": after["length"],
        "seconds": seconds,
        "peak_mb": peak_mb,
    }
    return sft_row, dpo_row


def best_of_n(output_dir: str, settings, n: int, seed: int) -> dict:
    """n answers per held-out prompt from the SFT policy, the one the reward model scores highest kept."""
    import math

    from fastppo.ppo.trainer import PPOTrainer

    config = pipeline.ppo_config(output_dir, settings, True, seed, name="best-of-n")
    trainer = PPOTrainer(config)
    prompts = [p for p in task.prompts()[1] for _ in range(settings.eval_samples_per_prompt)]
    candidates = pipeline.generate(trainer, [p for p in prompts for _ in range(n)], seed=pipeline.EVALUATE_SEED)
    scores = proxy_scorer(output_dir)(prompts=[p for p in prompts for _ in range(n)], responses=candidates, mean=False)
    chosen, chosen_scores = [], []
    for i in range(len(prompts)):
        best = max(range(i * n, (i + 1) * n), key=lambda j: scores[j])
        chosen.append(candidates[best])
        chosen_scores.append(scores[best])
    return {
        "method": f"best-of-{n} (SFT + reward model)",
        "kind": "inference",
        "gold": statistics.fmean(task.gold_rewards(prompts, chosen)),
        "proxy": statistics.fmean(chosen_scores),
        "kl": math.log(n) - (n - 1) / n,
        "length": statistics.fmean(len(r.split()) for r in chosen),
    }


def proxy_scorer(output_dir: str):
    """score(prompts, responses, mean=True): the learned reward model's mean (or per-answer) reward."""
    from fastppo.models import load_tokenizer
    from fastppo.stages.reward_model import load_reward_model, score

    path = os.path.join(output_dir, "reward_model")
    tokenizer = load_tokenizer(path, need_eos=True)
    model = pipeline.quiet_load(load_reward_model, path, tokenizer)

    def scorer(prompts, responses, mean: bool = True):
        scores = score(model, tokenizer, prompts, responses)
        return statistics.fmean(scores) if mean else scores

    return scorer


def measured(fn):
    """(fn(), wall seconds, peak resident memory in MiB above the resident size at the start, sampled every 50 ms)."""
    import gc

    gc.collect()
    start_rss = resident_mb()
    peak = [start_rss]
    done = threading.Event()

    def sample():
        while not done.wait(0.05):
            peak[0] = max(peak[0], resident_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        result = fn()
    finally:
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
    return result, seconds, max(peak[0], resident_mb()) - start_rss


def resident_mb() -> float:
    """The process's resident set size in MiB (Linux /proc; elsewhere the peak so far, from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
