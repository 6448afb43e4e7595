"""`fastppo <command>`: the command-line entry point.

Each command is a module (or an object, "module:attribute") with `add_arguments(parser)` and `run(args) -> int`;
it is imported only when its command runs, so `fastppo doctor` does not pay for importing transformers.
With no command, `fastppo` runs the built-in demo (the same as `fastppo train` with no config). The benchmark suite is
not a command: it lives in the repository (`python -m bench` from a checkout), not in the installed package.

Errors the user can act on end in one line and an exit code (fastppo/runtime/errors.py has the table); anything else
is a bug and shows its traceback. Under `fastppo train --nproc N` a worker hands its line to the launcher instead,
which prints the one that explains the run's end (runtime/launcher.py).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from fastppo.runtime import launcher, run_lock
from fastppo.runtime.errors import EXIT_BUG, reported
from fastppo.runtime.validation import clip

MAX_MESSAGE = 2000  # characters: an error names the culprit, it does not quote a whole file

COMMANDS = {
    "train": ("fastppo.cli.train", "run PPO from a YAML config (no config: the built-in demo)"),
    "demo": ("fastppo.demo.pipeline", "the built-in offline RLHF pipeline: SFT, reward model, PPO, evaluation"),
    "sft": ("fastppo.cli.stages:SFT", "supervised fine-tuning on a JSONL of {prompt, response}"),
    "reward-model": (
        "fastppo.cli.stages:REWARD_MODEL",
        "train a reward model on a JSONL of {prompt, chosen, rejected}",
    ),
    "dpo": ("fastppo.cli.stages:DPO", "Direct Preference Optimization on a JSONL of {prompt, chosen, rejected}"),
    "compare": ("fastppo.demo.compare", "PPO, VAPO, GRPO, RLOO, REINFORCE++, DPO and best-of-n on the demo task"),
    "doctor": ("fastppo.cli.doctor", "which backend each op uses on this machine, and why"),
    "selfcheck": ("fastppo.cli.selfcheck", "check every op against its reference here and time it"),
}


def command(spec: str):
    """A command's module, or "module:attribute" for an object with the same `add_arguments` and `run`."""
    module, _, attribute = spec.partition(":")
    loaded = importlib.import_module(module)
    return getattr(loaded, attribute) if attribute else loaded


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["demo", *argv]
    parser = argparse.ArgumentParser(prog="fastppo", description="A kernel-optimized PPO trainer for RLHF.")
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        command_parser.set_defaults(module=module_name)
        if argv[0] == name:  # only the chosen command's module is imported
            command(module_name).add_arguments(command_parser)
    args = parser.parse_args(argv)
    if "WORLD_SIZE" in os.environ:  # one of torchrun's (or the launcher's) processes
        launcher.die_with_parent()
    unguard = guard_closed_output()
    try:
        return int(command(args.module).run(args) or 0)
    except KeyboardInterrupt:  # a second Ctrl-C: the user insists (see signals.py)
        return _report(f"fastppo {args.command}: interrupted", 130)
    except Exception as error:  # noqa: BLE001 - reported in one line, or a bug: its traceback
        found = reported(error)
        if found is not None:
            code, word = found
            return _report(f"fastppo {args.command}: {word}: {clip(error, MAX_MESSAGE)}", code)
        if not launcher.is_worker():
            raise
        launcher.record_outcome(EXIT_BUG, traceback.format_exc())
        return EXIT_BUG
    finally:
        run_lock.release_all()
        unguard()


def _report(line: str, code: int) -> int:
    """The one line a stopped command ends with, on stderr (or handed to the launcher, which prints it)."""
    if launcher.is_worker():
        launcher.record_outcome(code, line)
    else:
        print(line, file=sys.stderr)
    return code


class _ClosedOutputGuard:
    """A text stream that, once its reader is gone (`fastppo train ... | head`), writes into /dev/null instead of
    raising BrokenPipeError: the run goes on, saves, and exits as it ends."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def _to_devnull(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())  # what is still buffered goes there at the next flush
        os.close(devnull)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def guard_closed_output():
    """Until the returned function is called (it flushes and puts the streams back), stdout and stderr keep working
    after their reader has gone (see `_ClosedOutputGuard`)."""
    guarded = {}
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        try:
            stream.fileno()
        except (AttributeError, OSError, ValueError):  # not a file (pytest's capture): nothing to guard
            continue
        guarded[name] = stream
        setattr(sys, name, _ClosedOutputGuard(stream))

    def unguard() -> None:
        for name, stream in guarded.items():
            getattr(sys, name).flush()  # through the guard: a closed pipe's leftovers go to /dev/null
            setattr(sys, name, stream)

    return unguard


if __name__ == "__main__":
    sys.exit(main())
