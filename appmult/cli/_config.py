"""Command-line options that fill a config dataclass (``RetrainConfig``, ``AssignConfig``).

The dataclass is the one home of every default: :func:`add_option` reads it for the
option (and for its help text's ``%(default)s``), :func:`build_config` passes every option
named after a field back to the dataclass, which validates. Help texts stay with the
commands.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any


def field_default(config: type, name: str) -> Any:
    """The default of field ``name`` of the dataclass ``config``.

    Raises:
        TypeError: ``config`` has no such field, or the field has no default.
    """
    fields = {f.name: f for f in dataclasses.fields(config)}
    if name not in fields:
        raise TypeError(f"{config.__name__} has no field {name!r}")
    f = fields[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"{config.__name__}.{name} has no default")


def _shown(value: Any) -> str:
    # How a default reads on the command line: `--grad ste lut2d`, not ('ste', 'lut2d').
    return " ".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def add_option(parser: argparse.ArgumentParser, config: type, name: str, *flags: str,
               **kwargs: Any) -> argparse.Action:
    """``parser.add_argument(*flags, dest=name, default=<config's default of name>, **kwargs)``.

    ``parser`` may also be an argument group.

    A flag that turns a default off (``--no-progress``) is ``action="store_false"`` on a
    field whose default is True; ``store_true`` needs a default of False. ``%(default)s``
    in ``help`` shows the default as one would type it.

    Raises:
        TypeError: an unknown field, or a store_true/store_false flag on a field whose
            default it would not change.
    """
    default = field_default(config, name)
    action = kwargs.get("action")
    if action in ("store_true", "store_false") and default is not (action == "store_false"):
        raise TypeError(f"{'/'.join(flags)} ({action}) cannot change {config.__name__}.{name}, "
                        f"whose default is {default!r}")
    if "help" in kwargs:
        kwargs["help"] = kwargs["help"].replace("%(default)s", _shown(default).replace("%", "%%"))
    return parser.add_argument(*flags, dest=name, default=default, **kwargs)


def build_config(config: type, args: argparse.Namespace, **values: Any) -> Any:
    """``config`` from every option named after one of its fields, and ``values``.

    Raises:
        Whatever ``config`` raises for a value that makes no sense.
    """
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(config) if hasattr(args, f.name)}
    given.update(values)
    return config(**given)
