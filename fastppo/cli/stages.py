"""`fastppo sft`, `fastppo reward-model` and `fastppo dpo`: one interface for every stage.

Each reads its typed config (`fastppo.runtime.config_base`) from `--config x.yaml`, then `--set key=value`, then
its flags (one per field: `--learning-rate 1e-5`), checks it, and runs the stage. `fastppo train` (cli/train.py)
reads PPOConfig the same way.
"""

from __future__ import annotations

import argparse
import importlib


class StageCommand:
    """A stage's command: its config class and the `run(config)` that trains it, named "module:attribute"."""

    def __init__(self, config_class: str, run: str):
        self.config_class, self.run_function = config_class, run

    @staticmethod
    def _load(spec: str):
        module, _, name = spec.partition(":")
        return getattr(importlib.import_module(module), name)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        config_class = self._load(self.config_class)
        config_class.add_arguments(parser)
        if "resume_from" in config_class.field_names():
            parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint of output_dir")

    def run(self, args) -> int:
        config = self._load(self.config_class).from_args(args)
        if getattr(args, "resume", False) and config.resume_from is None:
            config.resume_from = config.output_dir
        result = self._load(self.run_function)(config)
        return result if isinstance(result, int) else 0


SFT = StageCommand("fastppo.stages.sft_config:SFTConfig", "fastppo.stages.sft:run")
REWARD_MODEL = StageCommand("fastppo.stages.reward_model_config:RewardModelConfig", "fastppo.stages.reward_model:run")
DPO = StageCommand("fastppo.stages.dpo_config:DPOConfig", "fastppo.stages.dpo:run")
