"""Assignment: tolerance respected, fallback, plan JSON, configs, CLI error messages."""

from __future__ import annotations

import json

import numpy as np
import pytest

from appmult.cli import main
from appmult.lut_gen import LutFile
from appmult.methods import (PLAN_FORMAT, AssignError, Candidate, assign, check_plan, choose, plan_configs)
from appmult.flows import AssignConfig, load_candidate
from appmult.methods.error_model import OperandStats


def lut(cut: int) -> LutFile:
    a = np.arange(16)
    return LutFile((np.outer(a, a) >> cut) << cut, width_a=4, width_b=4, signed=False,
                   metadata={"spec": f"t{cut}", "cost": {"relative": {"transistors": 1 - 0.1 * cut}}})


def test_choose_respects_tolerance():
    rng = np.random.default_rng(0)
    costs = {f"c{i}": float(c) for i, c in enumerate(rng.random(6))}
    for trial in range(50):
        preds = {f"l{j}": {c: float(rng.random() * 10) for c in costs} for j in range(4)}
        tol = {f"l{j}": float(rng.random() * 10) for j in range(4)}
        plan = choose(tol, preds, costs)
        for layer, row in plan.items():
            fitting = [c for c, s in preds[layer].items() if s <= tol[layer]]
            if fitting:
                assert row["fits"] and row["predicted_sigma"] <= row["tolerance"]
                assert row["cost"] == min(costs[c] for c in fitting)
            else:  # fallback: the most accurate candidate
                assert not row["fits"] and row["predicted_sigma"] == min(preds[layer].values())


def test_choose_ties_and_wrong():
    got = choose({"l": 5.0}, {"l": {"a": 4.0, "b": 1.0, "exact": 0.0}}, {"a": 0.5, "b": 0.5, "exact": 1.0})
    assert got["l"]["chosen"] == "b"  # same cost: the more accurate one
    got = choose({"l": 0.0}, {"l": {"a": 4.0, "exact": 0.0}}, {"a": 0.5, "exact": 1.0})
    assert got["l"]["chosen"] == "exact" and got["l"]["fits"]  # exact (sigma 0) always fits
    with pytest.raises(AssignError, match="Tolerance of layer 'l' must be a finite non-negative number, not -1"):
        choose({"l": -1.0}, {"l": {"a": 1.0}}, {"a": 1.0})
    with pytest.raises(AssignError, match="No cost for candidate 'a'"):
        choose({"l": 1.0}, {"l": {"a": 1.0}}, {})


def stats(name: str, k: int, exact_std: float) -> OperandStats:
    rng = np.random.default_rng(k)
    return OperandStats(name=name, fan_in=k, ops=k * 10, activation_operand="a", hist_x=rng.random(16),
                         hist_w=rng.random(16), fields=rng.integers(0, 16, (32, k)),
                         weights=rng.integers(0, 16, (3, k)), exact_std=exact_std)


def test_assign_plan_json_and_configs(tmp_path):
    cands = [Candidate(f"t{c}", lut(c), 1 - 0.1 * c, f"t{c}") for c in (0, 1, 2, 3)]
    st = {"a": stats("a", 9, 200.0), "b": stats("b", 30, 200.0)}
    plan = assign(st, {"a": 0.01, "b": 0.2}, cands)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    back = check_plan(json.loads(path.read_text()))
    assert back["format"] == PLAN_FORMAT
    for row in back["layers"]:
        assert row["tolerance"] == pytest.approx(200.0 * {"a": 0.01, "b": 0.2}[row["layer"]])
        assert row["predicted_sigma"] <= row["tolerance"]
    # Layer a tolerates 2, layer b 40: b gets a cheaper multiplier than a.
    assert back["layers"][1]["cost"] < back["layers"][0]["cost"]
    ops = [r["ops"] for r in back["layers"]]
    assert back["total_relative_cost"] == pytest.approx(
        sum(o * r["cost"] for o, r in zip(ops, back["layers"])) / sum(ops))
    cfgs = plan_configs(back, cands)
    by_name = {c.name: c for c in cands}
    assert set(cfgs) == {"a", "b"}
    assert all(cfgs[r["layer"]].lut is by_name[r["chosen"]].lut for r in back["layers"])
    bad = dict(back, layers=[dict(back["layers"][0], chosen="zzz")])
    with pytest.raises(AssignError, match="Layer 'a' chose 'zzz', which is not a candidate"):
        check_plan(bad)
    with pytest.raises(AssignError, match="Not an assignment plan"):
        check_plan({"layers": []})


def test_assign_wrong(tmp_path):
    other = LutFile(np.outer(np.arange(8), np.arange(16)), width_a=3, width_b=4, signed=False)
    with pytest.raises(AssignError, match="All candidates must share widths and signedness"):
        assign({}, {}, [Candidate("x", lut(1), 0.5), Candidate("y", other, 0.5)])
    with pytest.raises(AssignError, match="No learned sigma for layer 'a'"):
        assign({"a": stats("a", 4, 1.0)}, {}, [Candidate("x", lut(1), 0.5)])
    path = tmp_path / "nocost.npz"
    LutFile(np.outer(np.arange(16), np.arange(16)), width_a=4, width_b=4, signed=False).save(path)
    with pytest.raises(AssignError, match="carries no relative 'transistors' cost"):
        load_candidate(path)
    lut(1).save(tmp_path / "t1.npz")
    assert load_candidate(tmp_path / "t1.npz").cost == pytest.approx(0.9)
    with pytest.raises(AssignError, match="Cost figure must be one of"):
        load_candidate(tmp_path / "t1.npz", figure="area")
    with pytest.raises(AssignError, match="Give at least one candidate multiplier"):
        AssignConfig(candidates=())


def test_cli_errors(tmp_path, capsys):
    path = tmp_path / "nocost.npz"
    LutFile(np.outer(np.arange(16), np.arange(16)), width_a=4, width_b=4, signed=False).save(path)
    assert main(["assign", str(path), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "appmult assign: error: LUT file" in capsys.readouterr().err
    assert main(["assign", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["assign", str(path), "--cost-figure", "area", "--out", str(tmp_path / "o")]) == 2
    assert "Cost figure must be one of" in capsys.readouterr().err
    assert main(["assign", str(path), "--retrain-epochs", "-1", "--out", str(tmp_path / "o")]) == 2
    assert "retrain_epochs must be a non-negative integer, not -1" in capsys.readouterr().err


def test_cli_refuses_a_directory_holding_a_run(tmp_path, capsys):
    """An --out holding plan.json or results.json (a run, or the user's own file of that name)
    is refused before any work unless --overwrite (found by fuzzing the CLI: both were
    replaced without a word)."""
    path = tmp_path / "nocost.npz"
    LutFile(np.outer(np.arange(16), np.arange(16)), width_a=4, width_b=4, signed=False).save(path)
    out = tmp_path / "o"
    out.mkdir()
    (out / "plan.json").write_text("mine")
    assert main(["assign", str(path), "--out", str(out), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == (f"appmult assign: error: Output directory {out} already holds an "
                                               "assignment run (plan.json); pass --overwrite (overwrite=True) to "
                                               "replace it")
    assert (out / "plan.json").read_text() == "mine"
    # with --overwrite the run goes on to its next check (this LUT has no cost)
    assert main(["assign", str(path), "--out", str(out), "--no-progress", "--overwrite"]) == 2
    assert "appmult assign: error: LUT file" in capsys.readouterr().err


@pytest.mark.parametrize("text, is_file", [
    ("m.npz", True), ("runs/m.npz", True), ("runs/lut", True), ("/abs/path/lut", True),
    ("exact:width=8", False), ("truncated:width=8,columns=4", False),
    ("netlist:path=run/circuits/c001.json,digest=0123456789abcdef", False),  # a spec holding a path
    ("runs/a:b/lut", True),  # a colon after a directory: still a path
])
def test_names_lut_file(text, is_file):
    from appmult.flows.assign import names_lut_file
    assert names_lut_file(text) is is_file
