"""SFTConfig: every knob of a `fastppo sft` run (the conventions of `fastppo.runtime.config_base`); `fastppo
reward-model`'s RewardModelConfig shares its fields."""

from __future__ import annotations

from dataclasses import dataclass

from fastppo.runtime.config_base import RESUME_FROM_HELP, Config, check_resume_from, option
from fastppo.runtime.validation import NON_NEGATIVE, POSITIVE


@dataclass
class SFTConfig(Config):
    model: str | None = option(None, "Causal LM to fine-tune: a checkpoint directory, or one holding a config.json.")
    data: str | None = option(None, 'JSONL file, one {"prompt": ..., "response": ...} per line.')
    output_dir: str = option("runs/sft", "Where the fine-tuned checkpoint and its tokenizer go.")
    tokenizer: str | None = option(None, "Tokenizer directory; defaults to model.")
    epochs: float = option(3.0, "Passes over the data (fractions allowed).")
    batch_size: int = option(16, "Examples per optimizer step.")
    micro_batch_size: int | None = option(
        None, "Examples per forward/backward (gradient accumulation, by length); None: batch_size."
    )
    micro_batch_tokens: int | None = option(
        None, "Tokens per forward/backward (rows x the longest, padding included), micro_batch_size rows at most."
    )
    learning_rate: float = option(5e-5, "AdamW peak learning rate (5% warmup, then linear decay).", aliases=("--lr",))
    max_length: int = option(512, "Tokens per example, prompt included; longer ones are cut at the end.")
    seed: int = option(0, "Seed of the batch order and of a freshly initialised model.")
    overwrite_output_dir: bool = option(False, "Replace a model (or a stopped run's checkpoints) in output_dir.")
    save_every: int = option(
        0,
        "Save a checkpoint every this many steps into output_dir/checkpoint-<step>; 0 = only when stopped by a signal.",
    )
    resume_from: str | None = option(None, RESUME_FROM_HELP)

    RANGES = {
        "epochs": POSITIVE,
        "batch_size": POSITIVE,
        "micro_batch_size": POSITIVE,
        "micro_batch_tokens": POSITIVE,
        "learning_rate": POSITIVE,
        "max_length": POSITIVE,
        "seed": NON_NEGATIVE,
        "save_every": NON_NEGATIVE,
    }
    FOREIGN = {
        "model_name_or_path": "use model",
        "dataset_name": "use data (a JSONL file)",
        "num_train_epochs": "use epochs",
        "per_device_train_batch_size": "use batch_size (per optimizer step) and micro_batch_size (per forward)",
        "max_seq_length": "use max_length",
    }

    def validate(self) -> SFTConfig:
        self.check_fields()  # types, RANGES
        check_resume_from(self.resume_from, self.output_dir)
        return self
