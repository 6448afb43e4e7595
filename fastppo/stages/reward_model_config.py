"""RewardModelConfig: every knob of a `fastppo reward-model` run (the conventions of `fastppo.runtime.config_base`)."""

from __future__ import annotations

from dataclasses import dataclass

from fastppo.runtime.config_base import Config, option
from fastppo.runtime.validation import NON_NEGATIVE, POSITIVE, Interval


@dataclass
class RewardModelConfig(Config):
    model: str | None = option(
        None, "A causal LM (usually the SFT checkpoint: a new score head is added) or a 1-label sequence classifier."
    )
    data: str | None = option(None, 'JSONL file, one {"prompt", "chosen", "rejected"} per line.')
    output_dir: str = option("runs/reward-model", "Where the reward model and its tokenizer go.")
    tokenizer: str | None = option(None, "Tokenizer directory; defaults to model.")
    epochs: float = option(1.0, "Passes over the training pairs (fractions allowed).")
    batch_size: int = option(16, "Pairs per optimizer step.")
    learning_rate: float = option(1e-5, "AdamW peak learning rate (5% warmup, then linear decay).", aliases=("--lr",))
    max_length: int = option(512, "Tokens per prompt + response; longer ones are cut at the end.")
    eval_fraction: float = option(0.1, "Pairs held out for the pairwise accuracy.")
    seed: int = option(0, "Seed of the split, the batch order and the new score head.")
    overwrite_output_dir: bool = option(False, "Replace a model already in output_dir.")

    RANGES = {
        "epochs": POSITIVE,
        "batch_size": POSITIVE,
        "learning_rate": POSITIVE,
        "max_length": POSITIVE,
        "eval_fraction": Interval(0, 1, high_open=True),
        "seed": NON_NEGATIVE,
    }
    FOREIGN = {
        "model_name_or_path": "use model",
        "dataset_name": "use data (a JSONL file)",
        "num_train_epochs": "use epochs",
        "per_device_train_batch_size": "use batch_size",
    }
