"""``appmult compare``: metrics and cost of several multipliers in one table, and a Pareto plot."""

from __future__ import annotations

import argparse
import json
import sys


#: What -o DIR receives.
_FILES = ("compare.json", "pareto.png")


def register(sub) -> None:
    p = sub.add_parser(
        "compare", help="compare multipliers: one table of error metrics and cost, and a Pareto plot",
        description="Characterize each spec (cached) and print one table of error metrics and hardware "
                    "cost. With -o DIR, also write compare.json and pareto.png (error against cost).")
    p.add_argument("specs", nargs="+", metavar="SPEC", help="multiplier specs")
    p.add_argument("-o", "--output", metavar="DIR", help="directory for compare.json and pareto.png")
    p.add_argument("--error", default="mre_pct", help="error metric of the Pareto plot (default mre_pct)")
    p.add_argument("--cost", default="transistors",
                   help="cost figure of the Pareto plot: transistors, aig_nodes, gates, depth, ... "
                        "(default transistors)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace compare.json and pareto.png already in DIR (without it they are refused)")
    p.add_argument("--no-cache", action="store_true", help="ignore and do not fill the characterization cache")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..errors import UsageError
    from ..files import atomic_write_text, check_output_dir
    from ..hdl import from_spec
    from ..flows import characterize
    from ..lut_gen.characterization import MAX_LUT_WIDTH
    from ..lut_gen.metrics import METRIC_KEYS
    from ..lut_gen.report import compare_rows, format_table, pareto_plot
    from ..sim.cost import FIGURES
    if args.error not in METRIC_KEYS:
        raise UsageError(f"Unknown error metric {args.error!r}; choose from {', '.join(METRIC_KEYS[:12])}")
    if args.cost not in FIGURES:
        raise UsageError(f"Unknown cost figure {args.cost!r}; choose from {', '.join(FIGURES)}")
    if args.overwrite and not args.output:
        raise UsageError("--overwrite replaces files in -o DIR: give -o, or drop --overwrite")
    if args.output:
        out = check_output_dir(args.output, files=_FILES)
        held = [name for name in _FILES if (out / name).exists()]
        if held and not args.overwrite:
            raise UsageError(f"Output directory {out} already holds {held[0]}; pass --overwrite to replace it, "
                             "or choose another -o")
    mults = [from_spec(s) for s in args.specs]  # all specs checked before any long work
    chars = []
    for m in tqdm(mults, desc="characterizing", unit="multiplier", disable=args.quiet or len(mults) < 2):
        full = max(m.width_a, m.width_b) <= MAX_LUT_WIDTH
        chars.append(characterize(m, gradients=(), progress=not args.quiet, cache=not args.no_cache,
                                  product=full))
    rows = compare_rows(chars)
    print(format_table(rows))
    if args.output:
        from pathlib import Path
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "compare.json", json.dumps(rows, indent=2) + "\n")
        path = pareto_plot(chars, out / "pareto.png", error=args.error, cost=args.cost)
        print(f"wrote {out / 'compare.json'} and {path}", file=sys.stderr)
    return 0
