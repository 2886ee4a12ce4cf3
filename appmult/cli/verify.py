"""``appmult verify``: simulate a multiplier's exported Verilog and compare it with its LUT file."""

from __future__ import annotations

import argparse
import sys


def register(sub) -> None:
    p = sub.add_parser(
        "verify", help="check the exported Verilog against a LUT file in a Verilog simulator",
        description="Export the spec's Verilog, simulate it (cocotb with Icarus Verilog or Verilator) and "
                    "compare every product with a LUT file: the given one, or one characterized from the "
                    "circuit. Operands up to 10 bits are checked exhaustively, wider ones on corner cases "
                    "plus a seeded random sample of distinct pairs (the report then says how many of all it "
                    "checked). Exit status 0: every checked product matches; 1: mismatches (listed); 2: error.")
    p.add_argument("spec", help="multiplier spec, e.g. truncated:width=8,signed=true,columns=4")
    p.add_argument("--sim", choices=("icarus", "verilator"), default="icarus",
                   help="simulator (default icarus)")
    p.add_argument("--lut", metavar="FILE",
                   help="LUT file to check against (default: characterize the circuit)")
    p.add_argument("--registered", action="store_true",
                   help="export and check the registered variant (clk, rst, one cycle latency)")
    p.add_argument("--build-dir", metavar="DIR",
                   help="keep the Verilog, logs and JSON result here (default: a temporary directory); "
                        "runs sharing one take turns")
    p.add_argument("--seed", type=int, default=0, help="seed of the random sample for wide operands")
    p.add_argument("--max-pairs", type=int, metavar="N", help="check at most N operand pairs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from ..files import check_output_dir
    from ..flows import circuit_lut
    from ..hdl import from_spec
    from ..lut_gen import load
    from ..tb import verify_multiplier

    if args.max_pairs is not None and args.max_pairs < 1:
        raise UsageError(f"--max-pairs must be at least 1, not {args.max_pairs}")
    mult = from_spec(args.spec)
    if args.build_dir:
        check_output_dir(args.build_dir, what="build directory")
    if args.lut:
        lut = load(args.lut)
        lut.check_compatible(width_a=mult.width_a, width_b=mult.width_b, signed=mult.signed,
                             what=f"multiplier {mult.spec}")
        source = args.lut
    else:
        print(f"characterizing {mult.spec} (exhaustive netlist simulation) ...", file=sys.stderr)
        lut = circuit_lut(mult)
        source = "characterized from the circuit"
    print(f"simulating {mult.spec} in {args.sim} against LUT {lut.lut_id} ({source}) ...", file=sys.stderr)
    result = verify_multiplier(mult, lut, sim=args.sim, registered=args.registered,
                               build_dir=args.build_dir, seed=args.seed, max_pairs=args.max_pairs)
    print(result.report())
    if result.build_dir:
        print(f"files in {result.build_dir}", file=sys.stderr)
    return 0 if result.passed else 1
