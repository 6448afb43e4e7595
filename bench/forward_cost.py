"""A forward's fixed cost in tokens: what `fastppo.runtime.micro_batches.forward_overhead` stands for.

The micro-batch planner (`batch.cut_sorted`) splits rows into another micro-batch only where that saves more padded
tokens than a forward's fixed cost. Here the policy of an e2e bench size runs forwards (no_grad, as step 3 and
scoring do) and forward + backward (as training does) of 1 to 8 rows; a least-squares line of seconds against
tokens gives the fixed cost (intercept) and the cost per token (slope); their ratio is the overhead in tokens.

    python -m bench.forward_cost [--size varlen|default|large|smollm2]
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
from pathlib import Path

SHAPES = [(1, 8), (1, 16), (1, 40), (2, 40), (1, 72), (2, 72), (4, 72), (8, 72), (4, 144)]  # (rows, tokens each)


def main(size: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from bench.e2e import SIZES, best_seconds, build_models

    cfg = SIZES[size]
    with tempfile.TemporaryDirectory() as tmp:
        build_models(cfg, Path(tmp))
        backbone = AutoModelForCausalLM.from_pretrained(Path(tmp) / "policy", dtype=torch.float32).model

    def step(rows: int, width: int, train: bool) -> None:
        ids = torch.randint(3, cfg["vocab"], (rows, width))
        with torch.set_grad_enabled(train):
            hidden = backbone(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
            if train:
                hidden.pow(2).mean().backward()

    out = {"size": size}
    for mode, train in (("forward", False), ("forward + backward", True)):
        points = [(r * w, best_seconds(functools.partial(step, r, w, train))) for r, w in SHAPES]
        tokens = torch.tensor([p[0] for p in points], dtype=torch.float64)
        seconds = torch.tensor([p[1] for p in points], dtype=torch.float64)
        design = torch.stack([torch.ones_like(tokens), tokens], dim=1)
        intercept, slope = torch.linalg.lstsq(design, seconds[:, None]).solution.flatten().tolist()
        out[mode] = {"fixed_ms": intercept * 1e3, "ms_per_token": slope * 1e3, "overhead_tokens": intercept / slope}
        print(f"{mode}: {intercept * 1e3:.1f} ms fixed + {slope * 1e3:.3f} ms / token = {intercept / slope:.0f} tokens")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="varlen")
    args = parser.parse_args()
    print(json.dumps(main(args.size), indent=2))
