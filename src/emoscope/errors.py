"""One exception type for every user-facing error.

The CLI turns an `EmoscopeError` into a single line on stderr and exit code 2; anything else is a bug
and keeps its traceback.
"""


class EmoscopeError(Exception):
    """A problem with the user's input (model, data, config, SAE, layer), explained in one line."""


def validated(cls, data, where: str = ""):
    """`cls.model_validate(data)` with the first validation problem as one EmoscopeError line."""
    from pydantic import ValidationError

    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(x) for x in err["loc"])
        raise EmoscopeError(f"{where}{key}: {err['msg']}" if key else f"{where}{err['msg']}") from None
