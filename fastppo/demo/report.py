"""The demo's outputs: a PNG of the training curves, a Markdown report, and the summary printed at the end.

All three read the summary dict that `pipeline.run_pipeline` builds: `eval` (held-out rows: step, gold, proxy,
length, kl, kl_coef), `train` (the trainer's per-step metrics), `samples`, `sft`, `reward_model`, `settings`,
`kl_control`, `algo`, `seconds`.
"""

from __future__ import annotations

import os

from fastppo.demo.task import MAX_GOOD_WORDS


def before_after(summary: dict) -> tuple[dict, dict]:
    """(the SFT policy's evaluation, the final PPO policy's evaluation)."""
    return summary["eval"][0], summary["eval"][-1]


ALGORITHM_NAMES = {
    "gae": "PPO",
    "vapo": "VAPO-style PPO",
    "grpo": "GRPO",
    "dr_grpo": "Dr. GRPO",
    "rloo": "RLOO",
    "reinforce++": "REINFORCE++",
    "reinforce++-baseline": "REINFORCE++-baseline",
}


def title(summary: dict) -> str:
    name = ALGORITHM_NAMES[summary.get("algo", "gae")]
    if summary["kl_control"]:
        return f"{name} with adaptive KL control (target {summary['settings']['adaptive_kl_target']:g} nats)"
    return f"{name} without KL control"


def verdict(summary: dict) -> str:
    before, after = before_after(summary)
    gold, proxy = after["gold"] - before["gold"], after["proxy"] - before["proxy"]
    if summary["kl_control"]:
        return (
            f"Gold reward went from {before['gold']:+.2f} to {after['gold']:+.2f} ({gold:+.2f}) and the proxy from "
            f"{before['proxy']:+.2f} to {after['proxy']:+.2f}, at a KL of {after['kl']:.2f} nats from the SFT policy "
            f"(target {summary['settings']['adaptive_kl_target']:g})."
        )
    return (
        f"With no KL penalty the proxy went from {before['proxy']:+.2f} to {after['proxy']:+.2f} ({proxy:+.2f}) while "
        f"gold went from {before['gold']:+.2f} to {after['gold']:+.2f} ({gold:+.2f}), answers from "
        f"{before['length']:.1f} to {after['length']:.1f} words, and the KL reached {after['kl']:.1f} nats: the "
        f"policy exploits where the reward model was never taught (repetition, length), which KL control prevents."
    )


def plot_curves(summary: dict, path: str) -> None:
    """Proxy reward, gold reward, KL and response length against PPO steps, in a 2x2 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals, train = summary["eval"], summary["train"]
    eval_steps = [r["step"] for r in evals]
    train_steps = [r.get("step", i + 1) for i, r in enumerate(train)]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    (proxy_ax, gold_ax), (kl_ax, length_ax) = axes

    if train and "reward/score_mean" in train[0]:
        proxy_ax.plot(
            train_steps, [r["reward/score_mean"] for r in train], color="tab:blue", alpha=0.3, label="rollouts"
        )
    proxy_ax.plot(eval_steps, [r["proxy"] for r in evals], "o-", color="tab:blue", label="held-out prompts")
    proxy_ax.set_title("proxy reward (the learned reward model)")
    proxy_ax.legend(loc="best", fontsize=8)

    gold_ax.plot(eval_steps, [r["gold"] for r in evals], "o-", color="tab:green", label="held-out prompts")
    gold_ax.axhline(evals[0]["gold"], color="gray", ls=":", label="SFT policy")
    gold_ax.set_title("gold reward (the hidden labeller)")
    gold_ax.legend(loc="best", fontsize=8)

    if train and "policy/kl" in train[0]:
        kl_ax.plot(train_steps, [r["policy/kl"] for r in train], color="tab:red", label="KL(policy || SFT)")
    if summary["kl_control"]:
        kl_ax.axhline(summary["settings"]["adaptive_kl_target"], color="gray", ls="--", label="target")
    kl_ax.set_title("KL to the SFT policy (nats per answer)")
    kl_ax.set_xlabel("PPO step")
    kl_ax.legend(loc="best", fontsize=8)

    if train and "rollout/response_length_mean" in train[0]:
        length_ax.plot(
            train_steps,
            [r["rollout/response_length_mean"] for r in train],
            color="tab:purple",
            alpha=0.3,
            label="rollouts (tokens)",
        )
    length_ax.plot(eval_steps, [r["length"] for r in evals], "o-", color="tab:purple", label="held-out (words)")
    length_ax.axhline(MAX_GOOD_WORDS, color="gray", ls="--", label="gold's length limit")
    length_ax.set_title("response length")
    length_ax.set_xlabel("PPO step")
    length_ax.legend(loc="best", fontsize=8)

    fig.suptitle(f"fastppo demo: {title(summary)}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _cell(text: str) -> str:
    return (text or "(empty)").replace("|", "\\|")


def write_report(summary: dict, path: str) -> None:
    before, after = before_after(summary)
    settings, seconds = summary["settings"], summary["seconds"]
    n_eval = settings["eval_samples_per_prompt"]
    lines = [
        f"# fastppo demo: {title(summary)}",
        "",
        "The classical RLHF pipeline on a generated task, offline: supervised fine-tuning of a tiny Llama, a reward "
        "model trained on preference pairs labelled by a hidden gold function, PPO against that reward model, and "
        "an evaluation against gold on held-out prompts (see `fastppo/demo/task.py` for the task).",
        "",
        f"## Result ({n_eval} samples on each of 20 held-out prompts)",
        "",
        "| policy | gold reward | proxy reward | KL to SFT (nats) | length (words) |",
        "|---|---:|---:|---:|---:|",
        f"| SFT (before PPO) | {before['gold']:+.2f} | {before['proxy']:+.2f} | 0.00 | {before['length']:.1f} |",
        f"| PPO, step {after['step']} | {after['gold']:+.2f} | {after['proxy']:+.2f} | {after['kl']:.2f} "
        f"| {after['length']:.1f} |",
        "",
        verdict(summary),
        "",
        f"The reward model's pairwise accuracy on held-out preference pairs is "
        f"{summary['reward_model']['eval_accuracy']:.3f} (the labels themselves are noisy). The KL column is the "
        f"trainer's estimate on its last {settings['eval_every']} rollout batches. The best possible gold reward is "
        f"about +6; the generated corpus averages {summary['sft']['corpus_gold']:+.2f}.",
        "",
        "![training curves](curves.png)",
        "",
        "## Sample completions (held-out prompts)",
        "",
        "| prompt | SFT policy | gold | PPO policy | gold |",
        "|---|---|---:|---|---:|",
    ]
    for s in summary["samples"]:
        lines.append(
            f"| {_cell(s['prompt'])} | {_cell(s['sft'])} | {s['sft_gold']:+.1f} | {_cell(s['ppo'])} "
            f"| {s['ppo_gold']:+.1f} |"
        )
    lines += [
        "",
        "## Run",
        "",
        f"- seconds: SFT {seconds['sft']:.0f}, reward model {seconds['reward_model']:.0f}, PPO with evaluation "
        f"{seconds['ppo_and_evaluation']:.0f}",
        f"- settings: {', '.join(f'{k}={v}' for k, v in settings.items())}, seed={summary['seed']}, "
        f"kl_control={summary['kl_control']}, algo={summary.get('algo', 'gae')}",
        "- files: `sft/` (SFT checkpoint), `reward_model/` (reward model), `ppo/` (PPO checkpoint and "
        "`metrics.jsonl`), `eval.jsonl` (held-out evaluations), `data/` (the generated SFT corpus and preference "
        "pairs), `curves.png`, `summary.json`",
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def summary_text(summary: dict) -> str:
    before, after = before_after(summary)
    out = summary["output_dir"]
    total = sum(summary["seconds"].values())
    return "\n".join(
        [
            "",
            f"fastppo demo: {title(summary)}, finished in {total:.0f}s",
            f"  {'held-out prompts':<20}{'gold':>8}{'proxy':>8}{'KL':>8}{'length':>8}",
            f"  {'SFT policy':<20}{before['gold']:>+8.2f}{before['proxy']:>+8.2f}{0:>8.2f}{before['length']:>8.1f}",
            f"  {'PPO policy':<20}{after['gold']:>+8.2f}{after['proxy']:>+8.2f}{after['kl']:>8.2f}"
            f"{after['length']:>8.1f}",
            f"  reward model held-out pairwise accuracy {summary['reward_model']['eval_accuracy']:.3f}",
            "  " + verdict(summary),
            f"  report {os.path.join(out, 'report.md')}, plot {os.path.join(out, 'curves.png')}",
        ]
    )
