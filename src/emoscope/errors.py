"""One exception type for every user-facing error.

The CLI turns an `EmoscopeError` into a single line on stderr and exit code 2; anything else is a bug
and keeps its traceback.
"""


class EmoscopeError(Exception):
    """A problem with the user's input (model, data, config, SAE, layer), explained in one line."""
