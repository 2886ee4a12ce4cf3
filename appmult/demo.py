"""``make demo``: the whole appmult story on bundled data, in a few minutes.

1. design an approximate multiplier (a built-in family, from a spec string);
2. export its Verilog (combinational, and an 8-lane MAC unit);
3. characterize it exhaustively: LUT file, metrics and cost next to the exact
   multiplier's, plots;
4. verify the exported Verilog in Icarus against the LUT file, every input pair;
5. retrain LeNet-5 on scikit-learn's bundled digits against that LUT, STE vs LUT-2D vs LUT-1D;
6. run real operands of the retrained first conv layer through the RTL MAC unit and
   check the RTL accumulators equal the layer's integer accumulators;
7. print the results and where every file is.

Run: ``python -m appmult.demo --out demo-out`` (``make demo`` does this).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from .files import atomic_write_text
from .flows import RetrainConfig, characterize, run_retrain
from .hdl import ExactMultiplier, MacUnit, Multiplier, export_verilog, from_spec
from .lut_gen.report import write_report
from .tb import verify_multiplier

DEFAULT_SPEC = "drum:width=8,k=3"


def _step(n: int, text: str) -> float:
    print(f"\n[{n}/7] {text}", flush=True)
    return time.perf_counter()


def _done(t0: float, text: str = "") -> None:
    print(f"      done in {time.perf_counter() - t0:.1f} s{('  ' + text) if text else ''}", flush=True)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m appmult.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo-out", help="output directory (default demo-out)")
    parser.add_argument("--spec", default=DEFAULT_SPEC, help=f"multiplier spec (default {DEFAULT_SPEC})")
    parser.add_argument("--epochs", type=int, default=5, help="retraining epochs per gradient mode (default 5)")
    parser.add_argument("--pretrain-epochs", type=int, default=30, help="FP32 pretraining epochs (default 30)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _design(spec: str) -> Multiplier:
    t = _step(1, f"design: {spec}")
    mult = from_spec(spec)
    print(f"      {type(mult).__name__}: {mult.width_a}x{mult.width_b} "
          f"{'signed' if mult.signed else 'unsigned'}, params {mult.params}  ({mult.DESCRIPTION})")
    _done(t)
    return mult


def _export(mult: Multiplier, out: Path, files: dict[str, Path]) -> None:
    t = _step(2, "export synthesizable Verilog")
    hw = out / "hw"
    files["verilog"] = hw / "appmult_mul.v"
    atomic_write_text(files["verilog"], export_verilog(mult, name="appmult_mul"))
    files["mac_verilog"] = hw / "appmult_mac8.v"
    atomic_write_text(files["mac_verilog"], export_verilog(MacUnit(mult, lanes=8), name="appmult_mac8"))
    _done(t, f"{files['verilog']}, {files['mac_verilog']}")


def _characterize(mult: Multiplier, out: Path, files: dict[str, Path]):
    t = _step(3, "characterize: simulate every input pair of the synthesized netlist")
    char = characterize(mult, gradients=("ste", "lut2d", "lut1d"), progress=False)
    written = write_report(char, out / "characterization")
    files.update({f"char_{k}": v for k, v in written.items()})
    m, rel = char.metrics, (char.cost or {}).get("relative", {})
    print(f"      ER {m['er_pct']:.1f}%  MRE {m['mre_pct']:.2f}%  NMED {m['nmed_pct']:.3f}%  WCE {m['wce']}  "
          f"bias {m['bias']:.1f}")
    if rel:
        exact = ExactMultiplier(width_a=mult.width_a, width_b=mult.width_b, signed=mult.signed)
        print(f"      cost vs exact {exact.spec}:"
              f" transistors {rel.get('transistors', float('nan')):.2f}x, AIG nodes {rel.get('aig_nodes', float('nan')):.2f}x,"
              f" depth {rel.get('depth', float('nan')):.2f}x, iCE40 LUT4 {rel.get('ice40_lut4', float('nan')):.2f}x")
    _done(t, f"LUT-2D half window {char.half_window}")
    return char


def _verify(files: dict[str, Path]):
    t = _step(4, "verify the exported Verilog in Icarus against the LUT file")
    ver = verify_multiplier(files["verilog"], files["char_lut"], sim="icarus")
    print(f"      {ver.summary()}")
    if not ver.passed:
        print(ver.report(), file=sys.stderr)
        return None
    _done(t)
    return ver


def _retrain(args: argparse.Namespace, out: Path, files: dict[str, Path]) -> dict[str, Any]:
    t = _step(5, "retrain LeNet-5 on the bundled digits against the LUT: STE vs LUT-2D vs LUT-1D")
    cfg = RetrainConfig(lut=str(files["char_lut"]), model="lenet5", dataset="digits", epochs=args.epochs,
                        pretrain_epochs=args.pretrain_epochs, batch_size=32, seed=args.seed,
                        grads=("ste", "lut2d", "lut1d"), out=str(out / "retrain"), progress=False,
                        verify_rtl=True, overwrite=True)  # the demo redoes its own run every time
    results = run_retrain(cfg)
    files["retrain_results"] = out / "retrain" / "results.json"
    files["retrain_table"] = out / "retrain" / "results.md"
    files["retrain_curves"] = out / "retrain" / "curves.png"
    _done(t)
    return results


def _rtl_check(results: dict[str, Any]) -> bool:
    # run_retrain did the RTL check (verify_rtl=True): real operands of each retrained model's
    # first conv layer through the MAC unit in Icarus, accumulators compared with the layer's.
    t = _step(6, "RTL MAC unit vs the retrained layer's integer accumulators (Icarus)")
    rtl_ok = True
    for mode, res in results["modes"].items():
        check = res.get("rtl_check") or {}
        rtl_ok &= bool(check.get("passed"))
        print(f"      {mode:6s} {check.get('summary', check)}")
    if not rtl_ok:
        print("RTL check failed: the hardware does not compute what the network was trained on",
              file=sys.stderr)
        return False
    _done(t, "(timed inside step 5)")
    return True


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    files: dict[str, Path] = {}
    mult = _design(args.spec)
    _export(mult, out, files)
    char = _characterize(mult, out, files)
    ver = _verify(files)
    if ver is None:
        return 1
    results = _retrain(args, out, files)
    if not _rtl_check(results):
        return 1
    m = char.metrics
    summary = {"spec": mult.spec, "metrics": {k: m[k] for k in ("er_pct", "mre_pct", "nmed_pct", "wce", "bias")},
               "cost_relative": (char.cost or {}).get("relative", {}),
               "verify": {"simulator": ver.simulator, "pairs": ver.pairs_checked, "passed": ver.passed},
               "retrain": results["modes"], "rtl_check_passed": True,
               "seconds": round(time.perf_counter() - t_start, 1)}
    files["summary"] = out / "summary.json"
    atomic_write_text(files["summary"], json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    print(f"\n[7/7] results ({summary['seconds']} s in all)\n")
    print(files["retrain_table"].read_text())
    print("files:")
    for name, path in files.items():
        print(f"  {name:18s} {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
