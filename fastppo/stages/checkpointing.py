"""`fastppo sft` and `fastppo reward-model` keep their progress as `fastppo train` does: a checkpoint every
`save_every` steps and when SIGINT or SIGTERM stops them (at the next step boundary), in runtime/checkpoint.py's
layout (the model in the Hugging Face layout, the optimizer, the scheduler, the RNG, the step), and `--resume`, which
replays the seeded batch order to the step it stopped at. The finished model still goes to output_dir itself.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Iterator

import torch

from fastppo.runtime.checkpoint import (
    check_resume_settings,
    clear_previous_run,
    load_checkpoint,
    remove_partial_checkpoints,
    resume_checkpoint,
    save_checkpoint,
)
from fastppo.runtime.rng import rng_state, set_rng_state
from fastppo.runtime.signals import StopRequest, stop_at_step_boundary

STATE_KEYS = ("step", "optimizer", "scheduler", "rng")


@dataclasses.dataclass
class Checkpointing:
    """Where and how often a supervised stage saves, and what it resumes from (`from_config`)."""

    output_dir: str
    command: str  # "sft" or "reward-model", for the messages and the run lock
    save_every: int = 0  # 0: only when a signal stops the run
    resume_from: str | None = None
    overwrite: bool = False

    @classmethod
    def from_config(cls, config, command: str) -> Checkpointing:
        return cls(config.output_dir, command, config.save_every, config.resume_from, config.overwrite_output_dir)


def run_steps(
    model,
    tokenizer,
    optimizer,
    scheduler,
    batches: Iterator[list[int]],
    train_step: Callable[[int, list[int]], None],
    total_steps: int,
    checkpointing: Checkpointing | None,
    settings: dict,
) -> tuple[StopRequest | None, int]:
    """`train_step(step, rows)` for each batch; returns (the StopRequest, the steps done). With `checkpointing`:
    resumed first when a checkpoint is there (its `settings`, what the batch order depends on, must be the same),
    saved every save_every steps, and stopped by SIGINT/SIGTERM at a step boundary with a checkpoint
    (`.requested`). Without: every step, no signal handling, no StopRequest."""
    if checkpointing is None:
        for step, rows in enumerate(batches):
            train_step(step, rows)
        return None, total_steps
    ckpt = checkpointing
    saveable = types.SimpleNamespace(lm=model)  # checkpoint.py's model: an `.lm`, no critic
    checkpoint = resume_checkpoint(ckpt.resume_from, ckpt.output_dir)
    start = 0
    if checkpoint:
        check_resume_settings(checkpoint, settings, fixed=tuple(settings))
        state = load_checkpoint(checkpoint, saveable, STATE_KEYS)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start = state["step"]
        print(f"fastppo {ckpt.command}: resumed from {checkpoint} at step {start}")
    clear_previous_run(ckpt.output_dir, ckpt.resume_from, ckpt.overwrite)
    remove_partial_checkpoints(ckpt.output_dir)

    def save(step: int) -> None:
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
        }
        # float32: exact for any training dtype, and loaded back in the model's own (checkpoint._load_weights)
        save_checkpoint(ckpt.output_dir, step, saveable, tokenizer, state, False, torch.float32, settings)

    done = start
    with stop_at_step_boundary() as stop:
        for step, rows in enumerate(batches):
            if step < start:  # the seeded order, replayed to where the checkpoint stopped
                continue
            if stop.requested:
                break
            train_step(step, rows)
            done = step + 1
            if ckpt.save_every and done % ckpt.save_every == 0 and done < total_steps:
                save(done)
        if stop.requested and done < total_steps:
            if done > start:
                save(done)
        else:
            stop.signum = None  # the run is complete: a signal during its last step stopped nothing
    return stop, done
