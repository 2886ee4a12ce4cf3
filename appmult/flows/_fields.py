"""Checks of configuration fields shared by :class:`RetrainConfig` and :class:`AssignConfig`.

Each check raises the error class it is given, with a message that names the field and the
offending value (``"epochs must be a positive integer, not 0"``). Standard library only:
the config modules are imported by ``appmult --help``, which must not wait for numpy or torch.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable


def is_int(value: object) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(error: type[Exception], name: str, value: object, *, low: int = 1, optional: bool = False) -> None:
    """``value`` is an integer ``>= low`` (``low`` 1: positive, 0: non-negative), or None if ``optional``."""
    if optional and value is None:
        return
    if not is_int(value) or value < low:
        kind = "a positive integer" if low == 1 else "a non-negative integer" if low == 0 else f"an integer >= {low}"
        raise error(f"{name} must be {kind}{' or None' if optional else ''}, not {value!r}")


def check_number(error: type[Exception], name: str, value: object, *, positive: bool = True) -> None:
    """``value`` is a finite real number, ``> 0`` if ``positive`` else ``>= 0``."""
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
          and (value > 0 if positive else value >= 0))
    if not ok:
        raise error(f"{name} must be {'a positive number' if positive else 'a finite non-negative number'}, "
                    f"not {value!r}")


def check_bool(error: type[Exception], name: str, value: object) -> None:
    """``value`` is True or False."""
    if not isinstance(value, bool):
        raise error(f"{name} must be a bool, not {value!r}")


def check_str(error: type[Exception], name: str, value: object, *, what: str = "a string",
              optional: bool = False) -> None:
    """``value`` is a str (``what`` says which kind, for the message), or None if ``optional``."""
    if optional and value is None:
        return
    if not isinstance(value, str):
        raise error(f"{name} must be {what}{' or None' if optional else ''}, not {value!r}")


def check_choice(error: type[Exception], label: str, value: object, choices: Iterable[str]) -> None:
    """``value`` is one of ``choices``; ``label`` starts the message (``"Model"``)."""
    choices = tuple(choices)
    if value not in choices:
        raise error(f"{label} must be one of {', '.join(map(repr, choices))}, not {value!r}")


def fspath_fields(cfg: object, names: Iterable[str]) -> None:
    """Turn the ``os.PathLike`` values of a frozen dataclass's ``names`` into str, in place."""
    for name in names:
        value = getattr(cfg, name)
        if isinstance(value, os.PathLike):
            object.__setattr__(cfg, name, os.fspath(value))
