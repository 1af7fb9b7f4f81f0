"""The project's user-facing errors: bad input the user can fix. `ladd-ds` prints their message
in one line and exits with status 2; any other exception is a bug and keeps its traceback."""

from __future__ import annotations


class LaddError(Exception):
    """Base of every error whose message tells the user what to change."""


class InputError(LaddError, ValueError):
    """A value in a config, a flag, a prompt or caption file, or a dataset that cannot be used."""


class MissingInputError(LaddError, FileNotFoundError):
    """A file or folder the command needs does not exist (the message names it)."""


class OutputExistsError(LaddError, FileExistsError):
    """The output a command would write exists already (the message says what to do)."""
