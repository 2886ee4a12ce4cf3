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

__all__ = ["main", "build_parser"]

ORDER = ["list", "export", "cost", "characterize", "compare", "verify", "retrain", "assign"]


_USER_RUNTIME_ERRORS = {"YosysError", "SimulatorNotFound"}


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


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
    except (CliError, ValueError, TypeError, FileNotFoundError) as exc:
        print(f"appmult {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        # Tool failures the user can act on (Yosys rejecting a design, a missing simulator)
        # are reported as one line; anything else is a bug and keeps its traceback.
        if not getattr(exc, "user_facing", False) and type(exc).__name__ not in _USER_RUNTIME_ERRORS:
            raise
        print(f"appmult {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
