"""Groups of responses to one prompt: how they are drawn, and DAPO's dynamic sampling of them.

A batch of B = n_groups x group_size sequences holds each group's rows consecutively (the layout
`ops.group_advantages` reads), and config validation makes every rank's share a whole number of groups, so a group
never straddles two ranks under torchrun.

Dynamic sampling (DAPO, arXiv 2503.14476): a group whose scores are all equal has a group advantage of 0 on every
token, so it only dilutes the batch. `filter_groups` drops such groups and rolls out more prompts until the batch is
full again; this module keeps the groups that count and joins the rollouts into one batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields

import torch
import torch.nn.functional as F

from fastppo.ppo.batch import RolloutBatch
from fastppo.runtime import distributed
from fastppo.runtime.metrics import Stats


def repeat_each(indices: list[int], group_size: int) -> list[int]:
    """Each prompt index `group_size` times in a row: [a, b] -> [a, a, b, b]."""
    return [i for i in indices for _ in range(group_size)]


def varied_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(n_groups,) bool: the groups whose scores are not all equal."""
    groups = scores.view(-1, group_size)
    return (groups != groups[:, :1]).any(-1)


def take_groups(batch: RolloutBatch, group_ids: torch.Tensor, group_size: int) -> RolloutBatch:
    """The sub-batch of whole groups `group_ids`, their rows kept consecutive."""
    rows = (group_ids.cpu()[:, None] * group_size + torch.arange(group_size)).flatten()
    return batch.select(rows)


def concat(batches: list[RolloutBatch], pad_token_id: int) -> RolloutBatch:
    """One batch of the rows of `batches`. Rollouts pad to their own widths: prompts are left-padded and responses
    right-padded to the widest (pad token for ids, 0 for masks), so every row keeps its tokens where they were."""
    if len(batches) == 1:
        return batches[0]
    joined = {}
    for f in fields(RolloutBatch):
        values = [getattr(b, f.name) for b in batches]
        if values[0] is None:
            joined[f.name] = None
        elif isinstance(values[0], list):
            joined[f.name] = [x for v in values for x in v]
        elif values[0].dim() == 1:
            joined[f.name] = torch.cat(values)
        else:
            width = max(v.shape[1] for v in values)
            fill = pad_token_id if f.name.endswith("_ids") else 0
            left = f.name.startswith("prompt")
            joined[f.name] = torch.cat(
                [F.pad(v, (width - v.shape[1], 0) if left else (0, width - v.shape[1]), value=fill) for v in values]
            )
    return RolloutBatch(**joined)


def dynamic_sampling(
    roll_out: Callable[[], RolloutBatch], group_size: int, max_tries: int, pad_token_id: int
) -> tuple[RolloutBatch, dict]:
    """(batch, stats): scored rollouts from `roll_out()` until this rank holds a full share of groups whose scores
    differ, at most `max_tries` rollouts; equal groups fill what is still missing then. Every rank rolls out as often
    as the neediest one (generation and scoring may be collective under torchrun)."""
    kept, spare, n_kept, dropped, tries = [], [], 0, 0, 0
    while True:
        batch, tries = roll_out(), tries + 1
        need = len(batch.prompts) // group_size
        varied = varied_groups(batch.scores, group_size).cpu()
        kept.append(take_groups(batch, varied.nonzero().flatten(), group_size))
        spare.append(take_groups(batch, (~varied).nonzero().flatten(), group_size))
        n_kept, dropped = n_kept + int(varied.sum()), dropped + int((~varied).sum())
        if tries == max_tries or not distributed.any_rank(n_kept < need):
            break
    batch = take_groups(concat(kept + spare, pad_token_id), torch.arange(need), group_size)
    counts = {"rollout/filtered_groups": float(dropped), "rollout/filler_groups": float(max(need - n_kept, 0))}
    stats = distributed.reduce_stats(Stats(counts, Stats.SUM)).as_dict()
    return batch, {**stats, "rollout/filter_rollouts": float(tries)}
