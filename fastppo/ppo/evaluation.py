"""Evaluation during training, and the completions table.

Every `eval_every` steps the policy answers the held-out `eval_prompts`, once each, sampled at the training
temperature (greedily with `eval_greedy`), in chunks of rollout_batch_size. The answers are scored by the run's
reward, and their KL to the reference is estimated as the training KL is (`kl_estimator`, summed over the tokens):

    eval/score_mean, eval/score_std     the reward's raw scores (several rewards: their weighted sum, as training's)
    eval/kl                             KL(policy || reference) per sequence; absent when greedy (a KL estimate
                                        needs samples of the policy) or when the run has no reference
    eval/response_length_mean           response tokens
    eval/ended_rate                     responses that ended (end-of-turn id or stop string), not cut at max_new_tokens

Evaluation draws from its own random stream (seeded with seed + step): it neither shifts the training run's samples
nor depends on when it runs, so two evaluations differ only by the policy. Its answers, and with `log_completions`
every training batch's, go to completions.jsonl (`completion_rows`: one line per prompt and completion).
"""

from __future__ import annotations

import sys

import torch

from fastppo.ppo.shaping import kl_per_token
from fastppo.runtime import distributed
from fastppo.runtime.errors import InputError
from fastppo.runtime.rng import rng_state, seed_everything, set_rng_state


def completion_rows(batch, scores: torch.Tensor, kl: torch.Tensor | None = None) -> list[dict]:
    """The completions table's rows of `batch`, gathered from every rank (in rank order): prompt, completion, the
    reward's raw score, whether it ended, its length in tokens, and its KL to the reference when estimated."""
    lengths = batch.response_mask.sum(-1).tolist()
    rows = []
    for i, (prompt, response) in enumerate(zip(batch.prompts, batch.responses, strict=True)):
        row = {"prompt": str(prompt), "completion": response, "score": float(scores[i])}
        row |= {"ended": bool(batch.ended[i]), "length": int(lengths[i])}
        if kl is not None:
            row["kl"] = float(kl[i])
        rows.append(row)
    return [row for rank_rows in distributed.all_gather_objects(rows) for row in rank_rows]


def evaluate(trainer) -> tuple[dict, list[dict]]:
    """(eval/* metrics, completions rows) of the policy on `trainer.eval_prompts` (see the module's docstring)."""
    cfg = trainer.config
    if not trainer.eval_prompts:
        raise InputError("evaluate: no eval_prompts (set them in the config, or PPOTrainer(..., eval_prompts=[...]))")
    greedy, world = cfg.eval_greedy, distributed.world_size()
    estimate_kl = trainer.uses_reference and not greedy
    rows = []
    state = rng_state()
    seed_everything(cfg.seed + trainer.step_count + 1_000_003 * distributed.rank())
    try:
        for start in range(0, len(trainer.eval_prompts), cfg.rollout_batch_size):
            chunk = trainer.eval_prompts[start : start + cfg.rollout_batch_size]
            # Every rank takes an equal share (each rolls out once per chunk: generation may be collective): the
            # chunk is padded with its own prompts to a multiple of the world size, and the padding's rows dropped.
            padded = [chunk[i % len(chunk)] for i in range(-(-len(chunk) // world) * world)]
            batch = trainer.rollout(distributed.share(padded), 0.0 if greedy else None)
            scores = trainer.reward.combine(trainer.reward_scores(batch))  # (B,) as training's raw scores
            kl = None
            if estimate_kl:
                trainer.compute_logprobs(batch)
                kl = kl_per_token(batch, cfg.kl_estimator).sum(-1)
            rows += completion_rows(batch, scores, kl)[: len(chunk)]
    finally:
        set_rng_state(state)
    scores = torch.tensor([row["score"] for row in rows])
    metrics = {
        "eval/score_mean": float(scores.mean()),
        "eval/score_std": float(scores.std()) if len(rows) > 1 else 0.0,
        "eval/response_length_mean": sum(row["length"] for row in rows) / len(rows),
        "eval/ended_rate": sum(row["ended"] for row in rows) / len(rows),
    }
    if estimate_kl:
        metrics["eval/kl"] = sum(row["kl"] for row in rows) / len(rows)
    return metrics, rows


def print_completions(rows: list[dict], step: int, limit: int | None) -> None:
    """`num_completions_to_print` of a training batch's completions on the console (TRL prints them with rich)."""
    from tqdm.auto import tqdm

    for row in rows[:limit]:
        tqdm.write(
            f"[step {step}] score {row['score']:.4g}\n  prompt: {row['prompt']!r}\n  completion: {row['completion']!r}",
            file=sys.stdout,
        )
