"""The one exception type the CLI turns into a one-line message."""


class DmuhError(Exception):
    """Bad input or state that the user can fix: the message names the file, field or flag."""
