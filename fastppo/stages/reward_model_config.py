"""RewardModelConfig: every knob of a `fastppo reward-model` run: SFTConfig's fields with a reward model's defaults,
and the held-out fraction its pairwise accuracy is measured on."""

from __future__ import annotations

from dataclasses import dataclass

from fastppo.runtime.config_base import option
from fastppo.runtime.validation import Interval
from fastppo.stages.sft_config import SFTConfig


@dataclass
class RewardModelConfig(SFTConfig):
    model: str | None = option(
        None, "A causal LM (usually the SFT checkpoint: a new score head is added) or a 1-label sequence classifier."
    )
    data: str | None = option(None, 'JSONL file, one {"prompt", "chosen", "rejected"} per line.')
    output_dir: str = option("runs/reward-model", "Where the reward model and its tokenizer go.")
    epochs: float = option(1.0, "Passes over the training pairs (fractions allowed).")
    batch_size: int = option(16, "Pairs per optimizer step.")
    learning_rate: float = option(1e-5, "AdamW peak learning rate (5% warmup, then linear decay).", aliases=("--lr",))
    seed: int = option(0, "Seed of the split, the batch order and the new score head.")
    eval_fraction: float = option(0.1, "Pairs held out for the pairwise accuracy.")

    RANGES = SFTConfig.RANGES | {"eval_fraction": Interval(0, 1, high_open=True)}
