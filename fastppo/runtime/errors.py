"""The errors the CLI reports without a traceback, and the exit codes: the one table (docs/robustness.md).

0    the run finished
1    an unexpected error (a bug): Python's traceback
2    bad input (`InputError`): a config field, a data file's line, a model directory, a reward that failed
3    numerics stopped the run (`FloatingPointError`)
4    the environment (`EnvironmentProblem`): the output directory is in use by another run, the disk is full
130  SIGINT, 143 SIGTERM: 128 + the signal's number, the shell's convention (`signals.StopRequest.exit_code`)
"""

import errno

EXIT_OK, EXIT_BUG, EXIT_INPUT, EXIT_NUMERICS, EXIT_ENVIRONMENT = 0, 1, 2, 3, 4


class InputError(ValueError):
    """Bad input (config field, data file line, model path), reported before any heavy work starts.

    The message must name the culprit: the config field, or the file and line.
    """


class EnvironmentProblem(RuntimeError):
    """Not the input but the machine: the output directory is held by another run, the disk is full. The message
    names the path and what to do."""


# (exception class, exit code, the word the CLI prints before the message), the first match wins
REPORTED = (
    (InputError, EXIT_INPUT, "error"),
    (FloatingPointError, EXIT_NUMERICS, "stopped"),
    (EnvironmentProblem, EXIT_ENVIRONMENT, "error"),
)


def reported(error: BaseException) -> tuple[int, str] | None:
    """(exit code, word) for an error the CLI reports in one line, None for any other (a bug: its traceback). A
    write that found the disk full anywhere (metrics, a final model; checkpoints say more) is the environment's."""
    for kind, code, word in REPORTED:
        if isinstance(error, kind):
            return code, word
    if out_of_space(error):
        return EXIT_ENVIRONMENT, "error: disk full"
    return None


def out_of_space(error: BaseException) -> bool:
    """Whether a failed write ran out of space: ENOSPC / EDQUOT anywhere in the exception's chain, or the words of
    the libraries that lose the errno (safetensors: "No space left on device (os error 28)")."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
