"""``appmult characterize``: LUT file, report and plots for one multiplier."""

from __future__ import annotations

import argparse
import sys


# What write_report puts into -o DIR (checked before the work, so a clash fails in a second).
_REPORT_FILES = ("lut.npz", "report.json", "report.md", "error_heatmap.png", "error_histogram.png",
                 "gradient_tables.png", "gradient_curves.png")


def _half_window(text: str):
    return text if text == "auto" else int(text)


def register(sub) -> None:
    p = sub.add_parser(
        "characterize", help="simulate a multiplier exhaustively: LUT file, metrics, cost, gradients, plots",
        description="Synthesize a multiplier, simulate every input pair of its gate netlist, and write the "
                    "LUT file (lut.npz), report.json, report.md and PNG plots into DIR. Operands wider than "
                    "12 bits (up to 16) get streamed metrics only.")
    p.add_argument("spec", help="multiplier spec, e.g. truncated:width=8,columns=4")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory")
    p.add_argument("--gradients", default="ste,lut2d,lut1d",
                   help="comma-separated gradient tables to store: ste, lut2d, lut1d, lre (default ste,lut2d,lut1d)")
    p.add_argument("--half-window", default="auto", type=_half_window, metavar="H",
                   help="LUT-2D half window: 1, 2, 4, ..., 64 or auto (default auto)")
    p.add_argument("--metrics-only", action="store_true", help="no product LUT (implied above 12 bits)")
    p.add_argument("--no-cost", action="store_true", help="skip the hardware-cost figures")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-cache", action="store_true", help="ignore and do not fill the characterization cache")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..files import check_output_dir
    from ..flows import characterize
    from ..hdl import from_spec
    from ..lut_gen.characterization import MAX_LUT_WIDTH
    from ..lut_gen.report import write_report
    check_output_dir(args.output, files=_REPORT_FILES)
    mult = from_spec(args.spec)
    gradients = tuple(g.strip() for g in args.gradients.split(",") if g.strip())
    full = not args.metrics_only and max(mult.width_a, mult.width_b) <= MAX_LUT_WIDTH
    if not full and not args.metrics_only:
        print(f"{mult.width_a}x{mult.width_b} is wider than {MAX_LUT_WIDTH} bits: metrics only", file=sys.stderr)
    char = characterize(mult, gradients=gradients, half_window=args.half_window, progress=not args.quiet,
                        cache=not args.no_cache, product=full, cost=not args.no_cost)
    files = write_report(char, args.output, plots=not args.no_plots)
    m = char.metrics
    print(f"{char.name}: ER {m['er_pct']:.2f}%  NMED {m['nmed_pct']:.4g}%  MRE {m['mre_pct']:.4g}%  "
          f"WCE {m['wce']}" + (f"  H={char.half_window}" if full and gradients else ""))
    for path in files.values():
        print(f"wrote {path}", file=sys.stderr)
    return 0
