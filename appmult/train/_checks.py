"""Argument checks shared by the model constructors of :mod:`appmult.train`."""

from __future__ import annotations

from ..errors import InvalidTypeError

__all__ = ["positive_int"]


def positive_int(what: str, value: object) -> int:
    """``value`` when it is a positive integer (bools excluded).

    Raises:
        appmult.errors.InvalidTypeError: anything else, naming ``what``.
    """
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidTypeError(f"{what} must be a positive integer, not {value!r}")
    return value
