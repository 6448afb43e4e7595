"""Errors that mean "the user's input is wrong", as opposed to a bug: the CLI prints them and exits with code 2."""


class InputError(ValueError):
    """Bad input (config field, data file line, model path), reported before any heavy work starts.

    The message must name the culprit: the config field, or the file and line.
    """
