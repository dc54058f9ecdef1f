"""The one exception type users see: its message is a single sentence naming the input and the fix."""


class DeploykitError(Exception):
    """A user-facing failure; the CLI prints its message without a traceback."""
