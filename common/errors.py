"""Error types whose message is shown to the user as-is (one line naming the file or option at fault)."""


class UserError(Exception):
    """A problem with the user's input (file, option, data); the CLI prints it and exits non-zero."""


class DataError(UserError):
    """A dataset file is missing, corrupt or malformed; the message names the file."""


class DataWarning(UserWarning):
    """Something in a dataset was repaired or skipped (e.g. boxes clipped to the image); training goes on."""
