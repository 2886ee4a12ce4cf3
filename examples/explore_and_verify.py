"""Search for a cheaper 6x6 multiplier, pick one, export its Verilog and verify it in Icarus.

Steps (each a public API call):

1. seed: the exact 6x6 multiplier's gate netlist (:func:`appmult.explore.seed_genome`);
2. search: a short (1 + lambda) run under MAE bounds (:func:`appmult.explore.search`);
3. pick the cheapest circuit with MAE at most 0.5% of 2**12 and write it as a circuit
   file; it is now the multiplier ``netlist:path=explored_6x6.json``;
4. characterize it (synthesized again by Yosys, every pair simulated: the LUT never
   comes from the search), export its Verilog, and check the Verilog against that LUT
   in Icarus Verilog with cocotb (skipped with a note when Icarus is not installed).

Run: ``python examples/explore_and_verify.py`` (writes ``explored_6x6.json`` and
``explored_6x6.v`` here; about a minute).
"""

from __future__ import annotations

import json
from pathlib import Path

from appmult.explore import ExploreConfig, search, seed_genome
from appmult.flows import characterize
from appmult.hdl import export_verilog, from_spec

MAX_MAE_PCT = 0.5


def main() -> None:
    genome, name = seed_genome("exact:width=6")
    exact_cost = genome.cost()["transistors"]
    config = ExploreConfig(error="mae", bounds=(0.05, 0.2, MAX_MAE_PCT), evaluations=15000, seed=1)
    result = search(genome, config, progress=False)
    print(f"searched from {name}: {result.evaluations} evaluations, {len(result.front)} circuits on the front")
    best = min((c for c in result.front if c.evaluation.mae_pct <= MAX_MAE_PCT), key=lambda c: c.cost["transistors"])
    print(f"picked: MAE {best.evaluation.mae_pct:.3f}% (search), about {best.cost['transistors']} transistors "
          f"(exact: {exact_cost})")

    path = Path("explored_6x6.json")
    path.write_text(json.dumps(best.genome.to_circuit(metadata={"found_by": "examples/explore_and_verify.py"})))
    mult = from_spec(f"netlist:path={path}")
    char = characterize(mult, gradients=(), progress=False, cache=False)
    print(f"{mult.spec}: re-synthesized, MAE {char.metrics['mae_pct']:.3f}%, "
          f"{char.cost['transistors']} transistors (Yosys)")
    Path("explored_6x6.v").write_text(export_verilog(mult, name="explored_6x6"))

    from appmult.tb import simulator_available, verify_multiplier
    if not simulator_available("icarus"):
        print("Icarus Verilog not installed: RTL check skipped")
        return
    check = verify_multiplier(mult, char.to_lutfile())
    print(f"Icarus: {check.pairs_checked} pairs, {check.mismatch_count} differ from the LUT "
          f"({'exhaustive' if check.exhaustive else 'sampled'})")
    if not check.passed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
