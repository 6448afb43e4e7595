"""`fastppo <command>`: the command-line entry point.

Each command is a module (or an object, "module:attribute") with `add_arguments(parser)` and `run(args) -> int`;
it is imported only when its command runs, so `fastppo doctor` does not pay for importing transformers.
With no command, `fastppo` runs the built-in demo (the same as `fastppo train` with no config). The benchmark suite is
not a command: it lives in the repository (`python -m bench` from a checkout), not in the installed package.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from fastppo.runtime.errors import InputError
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
    try:
        return int(command(args.module).run(args) or 0)
    except InputError as error:  # bad input, found before (or, for a reward, at) the step that needed it
        print(f"fastppo {args.command}: error: {clip(error, MAX_MESSAGE)}", file=sys.stderr)
        return 2
    except FloatingPointError as error:  # the trainer's diagnosis after too many non-finite steps in a row
        print(f"fastppo {args.command}: stopped: {error}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:  # a second Ctrl-C: the user insists (see signals.py)
        print(f"fastppo {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
