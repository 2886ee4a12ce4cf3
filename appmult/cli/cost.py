"""``appmult cost``: hardware-cost figures of a multiplier next to the exact multiplier's."""

from __future__ import annotations

import argparse
import json
import sys

# Rows of the table: (key, label, format).
_ROWS = [
    ("gates", "gates (simple 2-input + MUX)", "{:d}"),
    ("aig_nodes", "AIG nodes (aigmap ANDs)", "{:d}"),
    ("depth", "logic depth (levels, NOT free)", "{:d}"),
    ("transistors", "transistors (CMOS estimate)", "{:d}"),
    ("ice40_lut4", "iCE40 SB_LUT4", "{:d}"),
    ("ice40_carry", "iCE40 SB_CARRY", "{:d}"),
    ("toggles_per_op", "toggles per operation", "{:.1f}"),
    ("weighted_toggles_per_op", "transistor-weighted toggles", "{:.1f}"),
]


def register(sub) -> None:
    p = sub.add_parser("cost", help="hardware cost of a multiplier, relative to the exact one",
                       description="Synthesize a multiplier (spec FAMILY:key=value,..., see 'appmult list') "
                                   "and print gate count, AIG size, logic depth, transistor estimate, "
                                   "iCE40 LUT4 count and a switching-activity power proxy, next to the "
                                   "exact multiplier of the same widths and signedness.")
    p.add_argument("spec", help="multiplier spec, e.g. truncated:width=8,signed=true,columns=4")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--samples", type=int, default=1 << 14,
                   help="operand pairs for the switching-activity estimate (default 16384)")
    p.set_defaults(func=run)


def format_table(spec: str, figures: dict) -> str:
    """The figures as an aligned text table (figure, this multiplier, exact, ratio)."""
    exact, rel = figures["exact"], figures["relative"]
    head = ("figure", "this", "exact", "ratio")
    rows = [head]
    for key, label, fmt in _ROWS:
        ratio = rel.get(key)
        rows.append((label, fmt.format(figures[key]), fmt.format(exact[key]),
                     "n/a" if ratio is None else f"{ratio:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"this:  {spec}", f"exact: {figures['reference']}", ""]
    for n, r in enumerate(rows):
        lines.append("  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


#: The most operand pairs ``--samples`` takes (16.7 million; a huge value ran out of memory
#: with a traceback, and 0 or a negative one was silently raised to 64).
MAX_SAMPLES = 1 << 24


def run(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from ..hdl import from_spec
    from ..sim import hardware_cost, synthesize
    if not 1 <= args.samples <= MAX_SAMPLES:
        raise UsageError(f"--samples must be between 1 and {MAX_SAMPLES}, not {args.samples}")
    mult = from_spec(args.spec)
    print(f"synthesizing {mult.spec} and the exact reference ...", file=sys.stderr)
    figures = hardware_cost(synthesize(mult), samples=args.samples)
    if args.json:
        json.dump({"spec": mult.spec, **figures}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_table(mult.spec, figures))
    return 0
