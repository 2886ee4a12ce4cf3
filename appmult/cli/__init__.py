"""The ``appmult`` command line: one entry point, one module per subcommand.

Each module in this package defines ``register(subparsers)`` that adds its
subcommand (with ``set_defaults(func=...)``); modules are discovered, so adding a
command is adding a file. ``ORDER`` fixes the order in ``--help``.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from ..errors import UserError

__all__ = ["main", "build_parser"]

ORDER = ["list", "export", "cost", "characterize", "compare", "explore", "verify", "retrain", "assign"]


def _modules() -> list[str]:
    names = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="appmult",
        description="Design approximate multipliers, characterize them, retrain networks "
                    "against them and verify the RTL.",
        epilog="Multipliers are named by spec strings FAMILY:key=value,... e.g. "
               "'truncated:width=8,signed=true,columns=4' or 'exact:width_a=8,width_b=4'. "
               "'appmult list' shows the families and their keys.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _modules():
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        # The user's input or environment (appmult.errors): one line, exit status 2.
        # Anything else is a bug and keeps its traceback.
        print(f"appmult {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.filename is None:
            raise
        # A file the user named cannot be read or written (missing, a directory, no
        # permission): the message names it.
        print(f"appmult {args.command}: error: {exc.strerror or exc}: {exc.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
