"""Errors raised for bad user input (shown to the user as one line, never as a traceback)."""


class RegistrationInputError(ValueError):
    """Bad input: a missing/unreadable file, wrong dimensionality, NaN/inf, non-integer labels, ..."""
