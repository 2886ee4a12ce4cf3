"""The one error hierarchy of appmult.

Every exception appmult raises on purpose derives from :class:`AppmultError`. Those a
user caused and can act on (a bad spec string, a malformed LUT file, a missing
simulator, a parameter value that makes no sense) also derive from :class:`UserError`:
the ``appmult`` command prints exactly those as one line and exits with status 2;
anything else is a bug and keeps its traceback.

The concrete classes also derive from the built-in exception that describes them
(``ValueError`` for bad values, ``TypeError`` for values of the wrong type or out of
range -- Amaranth's convention for constructor arguments --, ``RuntimeError`` for
failures of a tool or a run, ``FileNotFoundError`` for missing files), so
``except ValueError`` keeps working for callers that do not know appmult's classes.
"""

from __future__ import annotations

__all__ = [
    "AppmultError",
    "ConfigError",
    "InvalidTypeError",
    "InvalidValueError",
    "MissingFileError",
    "SpecError",
    "UsageError",
    "UserError",
]


class AppmultError(Exception):
    """Base of every exception appmult raises on purpose."""


class UserError(AppmultError):
    """An error the user caused and can fix: shown as a message, never as a traceback."""


class InvalidValueError(UserError, ValueError):
    """A value given to appmult (argument, parameter, file content) that makes no sense."""


class InvalidTypeError(UserError, TypeError):
    """A value of the wrong type, or an integer out of its range (Amaranth's convention)."""


class ConfigError(InvalidValueError):
    """A field of a configuration dataclass (``ApproxConfig``, ``RetrainConfig``, ...) that makes no sense."""


class SpecError(InvalidValueError):
    """A spec string that does not parse or names parameters a family does not accept."""


class UsageError(InvalidValueError):
    """A command-line value that makes no sense (a path that cannot be written, a bad flag)."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the user named does not exist (or is not the kind of path expected)."""
