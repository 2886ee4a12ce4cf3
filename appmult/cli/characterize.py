"""``appmult characterize``: LUT file, report and plots for one multiplier."""

from __future__ import annotations

import argparse
import sys


# What write_report puts into -o DIR (checked before the work, so a clash fails in a second).
_REPORT_FILES = ("lut.npz", "report.json", "report.md", "error_heatmap.png", "error_histogram.png",
                 "gradient_tables.png", "gradient_curves.png")


def _half_window(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"Half window must be one of 1, 2, 4, ..., 64 or 'auto', "
                                         f"not {text!r}") from None


#: Gradient tables stored by default.
_GRADIENTS = ("ste", "lut2d", "lut1d")


def register(sub) -> None:
    p = sub.add_parser(
        "characterize", help="simulate a multiplier exhaustively: LUT file, metrics, cost, gradients, plots",
        description="Synthesize a multiplier, simulate every input pair of its gate netlist, and write the "
                    "LUT file (lut.npz), report.json, report.md and PNG plots into DIR. Operands wider than "
                    "12 bits (up to 16) get streamed metrics only.")
    p.add_argument("spec", help="multiplier spec, e.g. truncated:width=8,columns=4")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory")
    p.add_argument("--gradients", metavar="G1,G2,...",
                   help=f"comma-separated gradient tables to store: ste, lut2d, lut1d, lre, or none "
                        f"(default {','.join(_GRADIENTS)})")
    p.add_argument("--half-window", default="auto", type=_half_window, metavar="H",
                   help="LUT-2D half window: 1, 2, 4, ..., 64 or auto (default auto)")
    p.add_argument("--metrics-only", action="store_true", help="no product LUT (implied above 12 bits)")
    p.add_argument("--no-cost", action="store_true", help="skip the hardware-cost figures")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a report already in DIR (without it, any of its files there is refused)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-cache", action="store_true", help="ignore and do not fill the characterization cache")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import UsageError
    from ..files import check_output_dir
    from ..flows import characterize
    from ..hdl import from_spec
    from ..lut_gen.characterization import MAX_LUT_WIDTH
    from ..lut_gen.report import write_report
    out = check_output_dir(args.output, files=_REPORT_FILES)
    held = [name for name in _REPORT_FILES if (out / name).exists()]
    if held and not args.overwrite:
        raise UsageError(f"Output directory {out} already holds {held[0]}; pass --overwrite to replace the "
                         "report there, or choose another -o")
    mult = from_spec(args.spec)
    gradients = _gradients(args)
    full = not args.metrics_only and max(mult.width_a, mult.width_b) <= MAX_LUT_WIDTH
    if not full and not args.metrics_only:
        print(f"{mult.width_a}x{mult.width_b} is wider than {MAX_LUT_WIDTH} bits: metrics only", file=sys.stderr)
    char = characterize(mult, gradients=gradients, half_window=args.half_window, progress=not args.quiet,
                        cache=not args.no_cache, product=full, cost=not args.no_cost)
    files = write_report(char, args.output, plots=not args.no_plots)
    written = {Path(f).name for f in files.values()}
    for name in held:  # the old report's files this run did not write (a plot, the LUT) would outlive it
        if name not in written and (out / name).is_file():
            (out / name).unlink()
    m = char.metrics
    print(f"{char.name}: ER {m['er_pct']:.2f}%  NMED {m['nmed_pct']:.4g}%  MRE {m['mre_pct']:.4g}%  "
          f"WCE {m['wce']}" + (f"  H={char.half_window}" if full and gradients else ""))
    for path in files.values():
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _gradients(args: argparse.Namespace) -> tuple[str, ...]:
    """The gradient tables to store: ``--gradients`` (``none``: no table), or the default."""
    from ..errors import UsageError
    if args.gradients is None:
        return _GRADIENTS
    if args.metrics_only:
        raise UsageError("--gradients needs a product LUT; --metrics-only has none: drop one of them")
    items = [g.strip() for g in args.gradients.split(",")]
    if items == ["none"]:
        return ()
    if "" in items:
        raise UsageError(f"--gradients must be comma-separated names (or none), not {args.gradients!r}")
    return tuple(items)
