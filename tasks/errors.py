"""The error of a drill step that could not be done."""


class DrillError(RuntimeError):
    """A drill step could not be done; the message says what happened and where to look."""
