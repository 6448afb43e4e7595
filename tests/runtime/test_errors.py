"""The exit codes, defined once (fastppo/runtime/errors.py) and documented in one table (docs/robustness.md)."""

import errno
import re
from pathlib import Path

import pytest

from fastppo.ppo.rewards import RewardError
from fastppo.runtime.errors import EnvironmentProblem, InputError, reported


@pytest.mark.parametrize(
    "error, code",
    [
        (InputError("steps must be > 0"), 2),
        (RewardError("reward function f raised ValueError"), 2),
        (FloatingPointError("5 optimizer steps in a row had a non-finite gradient"), 3),
        (EnvironmentProblem("output_dir runs/a is in use by another run"), 4),
        (OSError(errno.ENOSPC, "No space left on device"), 4),
        (KeyError("x"), None),  # a bug: its traceback
        (OSError(errno.EACCES, "Permission denied"), None),
    ],
)
def test_each_error_has_its_exit_code(error, code):
    found = reported(error)
    assert (found[0] if found else None) == code


def test_the_documented_table_lists_every_code():
    table = (Path(__file__).parents[2] / "docs" / "robustness.md").read_text()
    documented = {int(c) for c in re.findall(r"^\| (\d+) \|", table, flags=re.MULTILINE)}
    assert documented == {0, 1, 2, 3, 4, 130, 143}
