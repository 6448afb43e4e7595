"""`fastppo train`: PPO from a YAML config; with no config, the built-in offline demo."""

from __future__ import annotations

import argparse
import os

from fastppo.demo import pipeline  # light: the demo's heavy imports happen when it runs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file whose keys mirror PPOConfig (see examples/ppo.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--resume", action="store_true", help="continue from the last valid checkpoint of output_dir")
    parser.add_argument("--nproc", type=int, default=None, metavar="N",
                        help="N processes on this machine (one per GPU), started by torchrun: the same as "
                        "`torchrun --standalone --nproc_per_node N -m fastppo train ...`")  # fmt: skip
    pipeline.add_arguments(parser.add_argument_group("without --config: the built-in demo"))  # the same flags


def run(args) -> int:
    if args.config is None:
        if args.set or args.resume or args.nproc:
            print("fastppo train: --set, --resume and --nproc need --config")
            return 2
        return pipeline.run(args)

    from fastppo.config import PPOConfig

    config = PPOConfig.from_yaml(args.config, args.set)
    if args.resume and config.resume_from is None:
        config.resume_from = config.output_dir
    if args.nproc is not None and args.nproc < 1:
        print(f"fastppo train: --nproc must be >= 1, got {args.nproc}")
        return 2
    nproc = None if "WORLD_SIZE" in os.environ else args.nproc  # already one of torchrun's processes: run
    config.validate(world_size=nproc)  # every field checked before any model is loaded (or process started)

    from fastppo import distributed

    if nproc and nproc > 1:  # this process becomes torchrun, whose processes run the rest of this function
        resume = ["--resume"] if args.resume else []
        distributed.launch(args.nproc, ["train", "--config", args.config, *(f"--set={s}" for s in args.set), *resume])

    from fastppo.trainer import PPOTrainer

    trainer = PPOTrainer(config)
    history = trainer.train()
    if not distributed.is_main():  # rank 0 reports for the run
        return trainer.stop_request.exit_code
    if trainer.stop_request.requested:
        print(f"stopped by {trainer.stop_request.name} at step {trainer.step_count}, checkpoint saved; "
              f"continue with: fastppo train --config {args.config} --resume")  # fmt: skip
        return trainer.stop_request.exit_code
    if history:
        last = history[-1]
        print(f"done: {trainer.step_count} steps, score {last['reward/score_mean']:.4f}, KL {last['policy/kl']:.4f}; "
              f"metrics in {config.output_dir}/metrics.jsonl")  # fmt: skip
    return 0
