"""``appmult export``: synthesizable Verilog for a multiplier spec."""

from __future__ import annotations

import argparse
import sys
import warnings


def register(sub) -> None:
    p = sub.add_parser("export", help="write synthesizable Verilog for a multiplier",
                       description="Write synthesizable Verilog for a multiplier given by a spec string "
                                   "FAMILY:key=value,... (see 'appmult list').")
    p.add_argument("spec", help="multiplier spec, e.g. truncated:width=8,signed=true,columns=4")
    p.add_argument("-o", "--output", help="output .v file (default: standard output)")
    p.add_argument("--name", default="appmult_mul", help="top module name (default appmult_mul)")
    p.add_argument("--registered", action="store_true", help="register the output (adds clk, rst)")
    p.add_argument("--mac", type=int, metavar="N",
                   help="export a MAC / dot-product unit of N lanes of this multiplier instead "
                        "(ports a, b packed, valid_in, clear, acc, valid_out, clk, rst; latency 2)")
    p.add_argument("--acc-width", type=int, metavar="W",
                   help="MAC accumulator width (default max(32, width_p + ceil(log2 N)); wraps mod 2**W; "
                        "narrower than one product warns)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from ..files import atomic_write_text, check_output_file
    from ..hdl import MacUnit, export_verilog, from_spec
    if args.output == "":
        raise UsageError("-o needs a file name (leave it out to write to standard output)")
    if args.output:
        check_output_file(args.output)
    mult = from_spec(args.spec)
    if args.mac is not None:
        if args.registered:
            raise UsageError("--registered applies to a bare multiplier; a MAC unit (--mac) is always registered")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mac = MacUnit(mult, lanes=args.mac, acc_width=args.acc_width)
        for w in caught:  # e.g. an accumulator narrower than one product: one line, not a source excerpt
            print(f"appmult export: warning: {w.message}", file=sys.stderr)
        text = export_verilog(mac, name=args.name)
    elif args.acc_width is not None:
        raise UsageError("--acc-width applies to a MAC unit; add --mac N")
    else:
        text = export_verilog(mult, name=args.name, registered=args.registered)
    if args.output:
        atomic_write_text(args.output, text)
        print(f"wrote {args.output} ({mult.spec}, module {args.name})", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
