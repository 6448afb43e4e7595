"""`fastppo train`: PPO from a YAML config; with no config, the built-in offline demo."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from fastppo.demo import pipeline  # light: the demo's heavy imports happen when it runs
from fastppo.runtime.errors import InputError
from fastppo.runtime.validation import check_model_dir, context_length


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file whose keys mirror PPOConfig (see examples/ppo.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--resume", action="store_true", help="continue from the last valid checkpoint of output_dir")
    parser.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="N processes on this machine (one per GPU), started by torchrun: the same as "
        "`torchrun --standalone --nproc_per_node N -m fastppo train ...`",
    )
    pipeline.add_arguments(parser.add_argument_group("without --config: the built-in demo"))  # the same flags


def run(args) -> int:
    if args.config is None:
        if args.set or args.resume or args.nproc:
            raise InputError("--set, --resume and --nproc need --config")
        return pipeline.run(args)

    from fastppo.ppo.config import PPOConfig

    config = PPOConfig.from_yaml(args.config, args.set)
    if args.resume and config.resume_from is None:
        config.resume_from = config.output_dir
    if args.nproc is not None and args.nproc < 1:
        raise InputError(f"--nproc must be >= 1, got {args.nproc}")
    nproc = None if "WORLD_SIZE" in os.environ else args.nproc  # already one of torchrun's processes: run
    config.validate(world_size=nproc)  # every field checked before any model is loaded (or process started)
    check_inputs(config)

    from fastppo.runtime import distributed

    if nproc and nproc > 1:  # this process becomes torchrun, whose processes run the rest of this function
        resume = ["--resume"] if args.resume else []
        distributed.launch(args.nproc, ["train", "--config", args.config, *(f"--set={s}" for s in args.set), *resume])

    from fastppo.ppo.trainer import PPOTrainer

    trainer = PPOTrainer(config)
    if config.resume_from and trainer.step_count >= config.steps and distributed.is_main():
        print(
            f"fastppo: the checkpoint is at step {trainer.step_count} and steps is {config.steps}: nothing to "
            "train (raise steps to continue)",
            file=sys.stderr,
        )
    history = trainer.train()
    if not distributed.is_main():  # rank 0 reports for the run
        return trainer.stop_request.exit_code
    if trainer.stop_request.requested and trainer.step_count == 0:
        print(f"stopped by {trainer.stop_request.name} during the first step: nothing to save", file=sys.stderr)
        return trainer.stop_request.exit_code
    if trainer.stop_request.requested:
        print(
            f"stopped by {trainer.stop_request.name} at step {trainer.step_count}, checkpoint saved; "
            f"continue with: {resume_command(args)}"
        )
        return trainer.stop_request.exit_code
    if history:
        last = history[-1]
        print(
            f"done: {trainer.step_count} steps, score {last['reward/score_mean']:.4f}, KL {last['policy/kl']:.4f}; "
            f"metrics in {config.output_dir}/metrics.jsonl"
        )
    return 0


def resume_command(args) -> str:
    """The command that continues this run: the same config and overrides, with --resume."""
    words = ["fastppo", "train", "--config", args.config, *(f"--set={s}" for s in args.set)]
    words += ["--nproc", str(args.nproc)] if args.nproc else []
    return shlex.join([*words, "--resume"])


def check_inputs(config) -> None:
    """What a run reads, checked before anything loads (or torchrun starts): the model directories (config.json,
    whole safetensors files) and whether a prompt plus its response fits their context, the reward function's
    module (imported), and every line of the prompts file."""
    from fastppo.data import read_prompt_records
    from fastppo.ppo.config import _is_callable_spec
    from fastppo.ppo.rewards import load_function

    for name, what in (
        ("policy_model", "a checkpoint directory"),
        ("reward_model", "a model directory or 'module:function'"),
        ("prompts", "a JSONL file or a list of strings"),
    ):
        if getattr(config, name) is None:
            raise InputError(f"{name}: missing from the config ({what})")
    _check_context("policy_model", check_model_dir("policy_model", config.policy_model), config)
    if _is_callable_spec(config.reward_model):
        load_function(config.reward_model)
    else:
        _check_context("reward_model", check_model_dir("reward_model", config.reward_model), config)
    if isinstance(config.prompts, str):
        read_prompt_records(config.prompts)


def _check_context(name: str, model_config: dict, config) -> None:
    context, longest = context_length(model_config), config.max_prompt_length + config.max_new_tokens
    if context is not None and longest > context:
        raise InputError(
            f"max_prompt_length + max_new_tokens = {longest} is beyond the context of {name} "
            f"({context} positions): lower max_new_tokens or max_prompt_length"
        )
