"""`fastppo compare`'s outputs: the Markdown table, the PNG (gold against KL, gold against wall time) and the
summary printed at the end. All read the summary dict `compare.run_comparison` builds (`rows`, `curves`, ...)."""

from __future__ import annotations

COLUMNS = ["method", "gold", "proxy", "proxy - gold", "KL (nats)", "length (words)", "wall time", "peak memory"]


def table(summary: dict) -> str:
    """The comparison as a Markdown table, one row per method, the SFT policy first."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 1)]
    for r in summary["rows"]:
        gap = r["proxy"] - r["gold"]
        cells = [
            r["method"],
            f"{r['gold']:+.2f}",
            f"{r['proxy']:+.2f}",
            f"{gap:+.2f}",
            f"{r['kl']:.2f}",
            f"{r['length']:.1f}",
            f"{r['seconds']:.0f} s",
            f"{r['peak_mb']:.0f} MiB",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def notes(summary: dict) -> str:
    s = summary["settings"]
    return (
        f"Same SFT model and reward model (held-out pair accuracy {summary['reward_model_accuracy']:.3f}; built once "
        f"in {summary['shared_seconds']:.0f} s). Online rows: {s['ppo_steps']} steps of {s['rollout_batch_size']} "
        f"sequences of at most {s['max_new_tokens']} tokens, adaptive KL penalty "
        f"(target {s['adaptive_kl_target']:g} nats) "
        f"except the no-KL row; KL is the trainer's estimate on its last 10 batches. DPO: "
        f"{summary['dpo_settings']['epochs']:g} epoch(s) over the reward model's {s['reward_pairs']} pairs, KL "
        f"sampled on the held-out answers. Best-of-{summary['best_of']}: KL is the analytic log n - (n - 1) / n. "
        f"Gold and proxy on the held-out prompts. Wall time includes each method's evaluations; peak memory is the "
        f"process's resident set, sampled every 50 ms, above its size when the method started."
    )


def write_table(summary: dict, path: str) -> None:
    with open(path, "w") as f:
        f.write(f"# fastppo compare (seed {summary['seed']})\n\n{table(summary)}\n\n{notes(summary)}\n")


def plot(summary: dict, path: str) -> None:
    """Left: gold against KL (each online method's path through its evaluations, every method's end point).
    Right: gold against wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (kl_ax, time_ax) = plt.subplots(1, 2, figsize=(12, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(summary["rows"]):
        color = colors[i % len(colors)]
        marker = {"online": "o", "offline": "s", "inference": "^", "start": "*"}[r["kind"]]
        path_points = summary["curves"].get(r["method"])
        if path_points:
            kl_ax.plot([p[0] for p in path_points], [p[1] for p in path_points], color=color, alpha=0.4)
        kl_ax.scatter(r["kl"], r["gold"], color=color, marker=marker, s=60, label=r["method"], zorder=3)
        time_ax.scatter(r["seconds"], r["gold"], color=color, marker=marker, s=60, label=r["method"], zorder=3)
    kl_ax.set_xlabel("KL to the SFT policy (nats)")
    kl_ax.set_ylabel("gold reward (held-out prompts)")
    kl_ax.set_title("gold reward against KL")
    time_ax.set_xlabel("wall time (s)")
    time_ax.set_title("gold reward against wall time")
    for ax in (kl_ax, time_ax):
        ax.grid(alpha=0.3)
    time_ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_text(summary: dict) -> str:
    d = summary["output_dir"]
    return f"\n{table(summary)}\n\n{notes(summary)}\n\nTable: {d}/compare.md  plot: {d}/compare.png\n"
