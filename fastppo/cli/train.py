"""`fastppo train`: PPO from a YAML config, `--set` overrides and flags; with neither a config nor a policy, the
built-in offline demo."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from fastppo.demo import pipeline  # light: the demo's heavy imports happen when it runs
from fastppo.ppo.config import PPOConfig
from fastppo.runtime.errors import InputError
from fastppo.runtime.validation import check_model_dir, context_length

DEMO_FIELDS = ("seed", "output_dir")  # PPOConfig flags the built-in demo takes too


def add_arguments(parser: argparse.ArgumentParser) -> None:
    PPOConfig.add_arguments(parser)  # --config, --set, and a flag per field
    parser.add_argument("--resume", action="store_true", help="continue from the last valid checkpoint of output_dir")
    parser.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="N processes on this machine (one per GPU), each with the environment torchrun would give it, ending "
        "as one process would (exit code, one message); torchrun -m fastppo train ... works too",
    )
    demo = parser.add_argument_group("without --config or --policy-model: the built-in demo (`fastppo demo`)")
    pipeline.add_demo_arguments(demo)


def run(args) -> int:
    flags = PPOConfig.flags_given(args)
    if args.config is None and not args.set and "policy_model" not in flags:
        return run_demo(args, flags)
    demo_only = [name for name in pipeline.DEMO_FLAGS if getattr(args, name, None)]
    if demo_only:
        raise InputError(f"--{demo_only[0].replace('_', '-')} is a flag of the built-in demo, not of a PPO run")
    config = PPOConfig.from_args(args)
    if args.resume and config.resume_from is None:
        config.resume_from = config.output_dir
    if args.nproc is not None and args.nproc < 1:
        raise InputError(f"--nproc must be >= 1, got {args.nproc}")
    nproc = None if "WORLD_SIZE" in os.environ else args.nproc  # already one of torchrun's processes: run
    config.validate(world_size=nproc)  # every field checked before any model is loaded (or process started)
    check_inputs(config)

    if nproc and nproc > 1:  # this process launches the workers, which run the rest of this function
        from fastppo.runtime import launcher

        worker_args = ["train", *settings_arguments(args), "--nproc", str(nproc)]  # --nproc: for the resume hint
        return launcher.launch(nproc, worker_args + (["--resume"] if args.resume else []))

    from fastppo.ppo.trainer import PPOTrainer
    from fastppo.runtime import distributed

    trainer = PPOTrainer(config)
    if config.resume_from and trainer.step_count >= config.steps and distributed.is_main():
        print(
            f"fastppo: the checkpoint is at step {trainer.step_count} and steps is {config.steps}: nothing to "
            "train (raise steps to continue)",
            file=sys.stderr,
        )
    history = trainer.train()
    # A finished run leaves its model alone, for from_pretrained (every rank: the weights may be sharded); a run a
    # signal stopped leaves its checkpoints only.
    final = trainer.save_model() if trainer.step_count > 0 and not trainer.stop_request.requested else None
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
        kl = f"KL {last['policy/kl']:.4f}" if "policy/kl" in last else "no reference"
        print(
            f"done: {trainer.step_count} steps, score {last['reward/score_mean']:.4f}, {kl}; "
            f"metrics in {config.output_dir}/metrics.jsonl; final model in {final}"
        )
    return 0


def run_demo(args, flags: dict) -> int:
    """`fastppo train` with neither a config nor a policy: the built-in demo, which takes only its own flags."""
    other = (
        sorted(set(flags) - set(DEMO_FIELDS)) + (["resume"] if args.resume else []) + (["nproc"] if args.nproc else [])
    )
    if other:
        raise InputError(
            f"--{other[0].replace('_', '-')}: a PPO run needs --config or --policy-model; without them `fastppo "
            "train` runs the built-in demo, which takes --quick, --algo, --no-kl-control, --seed and --output-dir"
        )
    print("fastppo train: no --config: running the built-in demo (`fastppo demo --help` for its options)")
    return pipeline.run(
        argparse.Namespace(**{name: getattr(args, name, None) for name in pipeline.DEMO_FLAGS}, **flags)
    )


def settings_arguments(args) -> list[str]:
    """This run's settings as command-line arguments: the config file, the overrides and the flags, as given."""
    words = ["--config", args.config] if args.config else []
    words += [f"--set={s}" for s in args.set]
    words += [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in PPOConfig.flags_given(args)]
    return words


def resume_command(args) -> str:
    """The command that continues this run: the same settings, with --resume."""
    words = ["fastppo", "train", *settings_arguments(args)]
    words += ["--nproc", str(args.nproc)] if args.nproc else []
    return shlex.join([*words, "--resume"])


def check_inputs(config) -> None:
    """What a run reads, checked before anything loads (or torchrun starts): the model directories (config.json,
    whole safetensors files) and whether a prompt plus its response fits their context, every prompt (a file's every
    line or row), and each reward: a function's module imported and its signature read against the prompts'
    columns, a model's directory checked."""
    from fastppo.data import read_prompt_records
    from fastppo.ppo.rewards import check_columns, is_model_spec, load_reward, reward_specs

    for name, what in (
        ("policy_model", "a checkpoint directory"),
        ("prompts", "a JSONL or Parquet file, a dataset directory or a list of strings"),
    ):
        if getattr(config, name) is None:
            raise InputError(f"{name}: missing from the config ({what})")
    if config.reward_model is None and config.reward_funcs is None:
        raise InputError(
            "reward_model: missing from the config (a model directory or 'module:function'; or reward_funcs, a list "
            "of them)"
        )
    config.resolve_model_sources()  # a known name or a GGUF file: converted (once) to a checkpoint directory
    _check_context("policy_model", check_model_dir("policy_model", config.policy_model), config)
    records = read_prompt_records(config.prompts, config.prompts_split)
    columns = dict.fromkeys(name for record in records for name in record.columns)
    functions = []
    for field, spec in reward_specs(config):
        if is_model_spec(spec):
            _check_context(field, check_model_dir(field, spec), config)
        else:  # a function: imported, its form told from its signature (no model loads)
            functions.append(load_reward(spec, config, None, None, columns=columns, field=field))
    if config.eval_prompts is not None:  # one split: prompts_split is the training prompts'
        check_columns(functions, read_prompt_records(config.eval_prompts, None, "eval_prompts"), "eval_prompts")
    if config.critic_model is not None:
        check_model_dir("critic_model", config.critic_model)


def _check_context(name: str, model_config: dict, config) -> None:
    context, longest = context_length(model_config), config.max_prompt_length + config.max_new_tokens
    if context is not None and longest > context:
        raise InputError(
            f"max_prompt_length + max_new_tokens = {longest} is beyond the context of {name} "
            f"({context} positions): lower max_new_tokens or max_prompt_length"
        )
