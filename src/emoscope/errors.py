"""One exception type for every user-facing error.

The CLI turns an `EmoscopeError` into a single line on stderr and exit code 2; anything else is a bug
and keeps its traceback.
"""

import re


class EmoscopeError(Exception):
    """A problem with the user's input (model, data, config, SAE, layer), explained in one line."""


def validated(cls, data, where: str = ""):
    """`cls.model_validate(data)` with the first validation problem as one EmoscopeError line: the user's key and
    what is wrong with it, without pydantic's internal location tags (`function-after[...]`, union members) or its
    "Value error, " prefix."""
    from pydantic import ValidationError

    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(x) for x in err["loc"] if isinstance(x, int) or not _INTERNAL.search(x))
        msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        raise EmoscopeError(f"{where}{key}: {msg}" if key else f"{where}{msg}") from None


_INTERNAL = re.compile(r"[\[\](),<>]|^(int|str|float|bool|list|dict|tuple|none)$")
"""pydantic's location tags that name a validator or a union member, not a key of the user's config."""
