"""The exceptions the command line turns into a clear message: `UserError` and its three kinds.

Anything a user can cause (a typo in a recipe, an empty folder, an unknown backbone)
raises `UserError` with a sentence naming the problem and the fix; the CLI prints that
sentence and exits non-zero, with the traceback only under `--debug`.
"""


class UserError(Exception):
    """A mistake in the user's input, with a message that says how to fix it."""


class ConfigError(UserError):
    """A recipe or override that cannot be used."""


class DataError(UserError):
    """A data set that cannot be read or is unusable as given."""


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed from."""
