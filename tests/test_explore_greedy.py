"""appmult.explore.greedy: every step's figures against independent evaluation, each step the
best single move by brute force, the walk as search starts, the merged front, the anchored
report, the CLI flag."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from appmult.explore import (Evaluator, ExploreConfig, genome_from_netlist, greedy_trajectory, pareto, search,
                             search_starts, thin_front, write_outputs)
from appmult.explore import _kernels as K
from appmult.explore.evaluator import Evaluation
from appmult.hdl import ExactMultiplier
from appmult.lut_gen import error_metrics, exact_product
from appmult.sim import Netlist, synthesize


def _exact(width, signed):
    return genome_from_netlist(synthesize(ExactMultiplier(width=width, signed=signed)))


def _config(**kw):
    base = dict(evaluations=400, bounds=(0.5, 3.0), seed=2)
    base.update(kw)
    return ExploreConfig(**base)


@pytest.mark.parametrize("width,signed", [(4, False), (4, True), (5, False)])
def test_every_step_equals_an_independent_evaluation(width, signed):
    seed = _exact(width, signed)
    cfg = _config(bounds=(1.0, 4.0))
    walk = greedy_trajectory(seed, cfg, progress=False)
    assert len(walk) >= 5
    plain = Evaluator(width, width, signed, use_numba=False)  # from scratch, numpy kernels
    costs = [seed.cost()["transistors"]] + [c.cost["transistors"] for c in walk]
    assert all(a > b for a, b in zip(costs, costs[1:]))  # every move saves
    for cand in walk:
        values = plain.outputs(cand.genome)
        ref = error_metrics(values.reshape(1 << width, 1 << width), exact_product(width, width, signed))
        assert cand.evaluation.mae_pct == pytest.approx(ref["mae_pct"], rel=1e-12, abs=1e-15)
        assert cand.evaluation.wce == ref["wce"]
        assert cand.evaluation.mae_pct <= 4.0
        assert cand.cost == cand.genome.cost()
        assert cand.bound == 4.0


def _reference_moves(genome):
    """Every genome one move away, enumerated independently of greedy._moves: any gate's
    table set to a constant or to a copy of one of its three inputs, any product bit to 0/1."""
    for g in range(genome.n_gates):
        for new in (0x00, 0xFF, 0xAA, 0xCC, 0xF0):
            if new != genome.tt[g]:
                child = genome.copy()
                child.tt[g] = new
                yield child
    for k in range(genome.width_p):
        for node in (0, 1):
            child = genome.copy()
            child.out[k] = node
            yield child


def test_each_step_is_the_best_single_move_by_brute_force():
    seed = _exact(3, False)
    cfg = _config(bounds=(6.0,))
    walk = greedy_trajectory(seed, cfg, progress=False)
    plain = Evaluator(3, 3, False, use_numba=False)
    current = seed
    for cand in walk:
        err0, cost0 = plain.evaluate(current).mae_pct, current.cost()["transistors"]
        ranks = []
        for child in _reference_moves(current):
            saving = cost0 - child.cost()["transistors"]
            err = plain.evaluate(child).mae_pct
            if saving > 0 and err <= 6.0:
                added = err - err0
                ranks.append((math.inf if added <= 0 else saving / added, saving))
        got = (cand.cost["transistors"], plain.evaluate(cand.genome).mae_pct)
        saving = cost0 - got[0]
        added = got[1] - err0
        assert (math.inf if added <= 0 else saving / added, saving) == pytest.approx(max(ranks))
        current = cand.genome
    # it stopped because no move was left within the bound
    err0, cost0 = plain.evaluate(current).mae_pct, current.cost()["transistors"]
    assert not any(cost0 - c.cost()["transistors"] > 0 and plain.evaluate(c).mae_pct <= 6.0
                   for c in _reference_moves(current))


def test_greedy_keeps_constraints_and_is_deterministic():
    seed = _exact(4, True)
    cfg = _config(bounds=(5.0,), constraints=(("wce", 2.0),))
    walk = greedy_trajectory(seed, cfg, progress=False)
    assert walk and all(c.evaluation.wce_pct <= 2.0 for c in walk)
    again = greedy_trajectory(seed, cfg, progress=False)
    assert [c.genome.to_state() for c in again] == [c.genome.to_state() for c in walk]
    assert len(greedy_trajectory(seed, cfg, max_steps=3, progress=False)) == 3


def test_greedy_under_operand_weights_equals_weighted_reference():
    from appmult.lut_gen.metrics import metrics_under
    seed = _exact(4, False)
    rng = np.random.default_rng(0)
    p_a, p_b = rng.random(16), rng.random(16) * (np.arange(16) % 4 != 0)
    cfg = _config(bounds=(2.0,), p_a=tuple(p_a), p_b=tuple(p_b))
    walk = greedy_trajectory(seed, cfg, max_steps=8, progress=False)
    plain = Evaluator(4, 4, False, use_numba=False)
    for cand in walk:
        lut = plain.outputs(cand.genome).reshape(16, 16)
        ref = metrics_under(lut, exact_product(4, 4, False), p_a, p_b)
        assert cand.evaluation.mae_pct == pytest.approx(ref["mae_pct"], rel=1e-9, abs=1e-15)


def test_walk_as_starts_lets_each_bound_begin_at_its_cheapest_walk_circuit():
    seed = _exact(4, False)
    cfg = _config(evaluations=80, bounds=(0.3, 1.0, 3.0))
    starts, walk = search_starts(seed, cfg, greedy=True, progress=False)
    assert [g.to_state() for g in starts] == [c.genome.to_state() for c in walk]
    result = search(seed, cfg, starts=starts, progress=False)
    for best in result.bests:  # the parent never gets worse than the start it was given
        within = [c.cost["transistors"] for c in walk if c.evaluation.mae_pct <= best.bound]
        assert best.cost["transistors"] <= min(within)
    merged = result.merged(walk)
    union = [*result.front, *walk]
    want = pareto(union, lambda c: c.cost["transistors"], lambda c: c.evaluation.mae_pct)
    assert [(c.cost["transistors"], c.evaluation.mae_pct) for c in merged.front] == \
        [(c.cost["transistors"], c.evaluation.mae_pct) for c in want]
    assert merged.evaluations == result.evaluations


def test_thin_front_keeps_the_cheapest_circuit_at_each_anchor():
    def cand(err):
        return type("C", (), {"evaluation": Evaluation(err, 0.0, 0, 0.0, 0.0, 0.0)})()

    errors = [10 ** (-k / 20) for k in range(60)]  # a front by increasing cost: error falls
    front = [cand(e) for e in errors]
    anchors = [0.95, 0.5, 0.123, 0.01]
    picked = thin_front(front, "mae", 4, anchors=anchors)
    for a in anchors:
        cheapest = next(c for c in front if c.evaluation.mae_pct <= a)
        assert any(p is cheapest for p in picked)
    assert picked[0] is front[0] and picked[-1] is front[-1]
    assert len(picked) <= 4 + len(anchors)


def test_cli_greedy_starts_reports_walk_circuits_recomputed_from_verilog(tmp_path, capsys):
    from appmult.cli import main
    out = tmp_path / "run"
    assert main(["explore", "--width", "3", "-o", str(out), "--evaluations", "100", "--bounds", "3,12",
                 "--report", "4", "--greedy-starts", "--no-sweep", "-q"]) == 0
    assert "greedy walk:" in capsys.readouterr().err
    doc = json.loads((out / "front.json").read_text())
    assert doc["found"]
    for row in doc["found"]:
        net = Netlist.from_verilog(row["verilog"], signed=False)
        m = error_metrics(net.exhaustive(), exact_product(3, 3, False))
        assert row["metrics"]["mae_pct"] == pytest.approx(m["mae_pct"], rel=1e-12, abs=1e-15)


def test_family_starts_without_a_sweep_is_an_error():
    from appmult.errors import InvalidValueError
    with pytest.raises(InvalidValueError, match="Family starts need the family sweep"):
        search_starts(_exact(3, False), _config(), family_starts=True, progress=False)


def test_moves_cover_every_active_gate():
    # the greedy move set: for each active gate its constants and its real inputs; nothing else
    from appmult.explore.greedy import _moves
    from appmult.explore.search import _active_gates
    seed = _exact(3, True)
    active = set(_active_gates(seed).tolist())
    seen = set()
    for child in _moves(seed):
        diff = np.flatnonzero(child.tt != seed.tt)
        if diff.size:
            g = int(diff[0])
            assert diff.size == 1 and g in active
            t = int(child.tt[g])
            assert t in (0x00, 0xFF) or (t in (0xAA, 0xCC, 0xF0) and K.tt_depends(int(seed.tt[g]),
                                                                                  (0xAA, 0xCC, 0xF0).index(t)))
            seen.add(g)
        else:
            assert int(np.flatnonzero(child.out != seed.out).size) == 1
    assert seen == active


def test_family_bounds_are_the_family_front_errors_in_the_comparison_range():
    from appmult.explore import SweepPoint, family_bounds

    def point(cost, mae):
        return SweepPoint("x", None, Evaluation(mae, 0.0, 0, 0.0, 0.0, 0.0), {"transistors": cost})

    family = [point(100, 2.0), point(200, 0.5), point(250, 0.6), point(300, 0.05), point(400, 0.005),
              point(500, 0.0), point(150, 0.8)]
    # the front: (100, 2.0) (150, 0.8) (200, 0.5) (300, 0.05) (400, 0.005) (500, 0); in 0.01..1%: three
    assert family_bounds(family, _config()) == (0.05, 0.5, 0.8)
    assert family_bounds(family, _config(error="er")) == ()  # er: every positive front error; here all 0


def test_cli_bounds_family(tmp_path, capsys):
    from appmult.cli import main
    out = tmp_path / "run"
    assert main(["explore", "--width", "3", "-o", str(out), "--evaluations", "60", "--bounds", "family",
                 "--report", "2", "-q"]) == 0
    doc = json.loads((out / "front.json").read_text())
    fam = [f["metrics"]["mae_pct"] for f in doc["family"] if f["spec"].split(":")[0] != "exact"]
    assert doc["config"]["bounds"] == sorted({e for e in fam if 0.01 <= e <= 1.0})
    assert [r["family_error"] for r in doc["comparison"]] == sorted(doc["config"]["bounds"], reverse=True)
    assert "bounds at the family front:" in capsys.readouterr().err
    assert main(["explore", "--width", "3", "-o", str(tmp_path / "other"), "--evaluations", "60", "--bounds",
                 "family", "--no-sweep", "-q"]) == 2
    assert capsys.readouterr().err.strip() == ("appmult explore: error: --bounds family needs the family sweep "
                                               "(drop --no-sweep)")
