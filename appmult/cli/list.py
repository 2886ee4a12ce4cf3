"""``appmult list``: the multiplier families, their keys and defaults."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("list", help="list multiplier families and their spec keys",
                       description="List the multiplier families and the keys their spec strings take.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..hdl import FAMILIES
    print("Spec syntax: FAMILY:key=value,...  common keys: width | width_a,width_b (2..16), "
          "signed=true|false")
    for name, cls in FAMILIES.items():
        print(f"\n{name:14s} {cls.__name__}: {cls.DESCRIPTION}")
        for p in cls.PARAMS:
            default = "" if p.default is None else f" (default {p.default})"
            print(f"    {p.name}={p.kind:5s} {p.help}{default}")
    return 0
