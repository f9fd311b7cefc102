"""User-facing error types.

A :class:`PtychoInputError` is raised for anything a user can cause (a bad
file, field, flag or request). Its message is one line naming what was wrong
and what was expected; the CLI prints it without a traceback.
"""


class PtychoInputError(ValueError):
    """Bad user input: a file, a field in it, a flag or a request."""


def field_error(source: str, field: str, found: str, expected: str) -> PtychoInputError:
    """Build the house-style one-line error: ``{source}: field '{field}': found ..., expected ...``."""
    return PtychoInputError(f"{source}: field '{field}': found {found}, expected {expected}")
