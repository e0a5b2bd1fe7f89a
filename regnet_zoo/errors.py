"""Errors raised for bad user input (shown to the user as one line, never as a traceback)."""


class RegistrationInputError(ValueError):
    """Bad input: a missing/unreadable file, wrong dimensionality, NaN/inf, non-integer labels, ..."""


class NonFiniteError(FloatingPointError):
    """A non-finite training loss, gradient or weight: training stops, nothing non-finite is written."""


def user_error(err: BaseException) -> RegistrationInputError | None:
    """The ``RegistrationInputError`` behind ``err`` (itself, or in its ``__cause__`` / ``__context__`` chain,
    e.g. wrapped by MONAI's config parser), or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, RegistrationInputError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None
