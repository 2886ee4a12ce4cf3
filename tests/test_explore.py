"""appmult.explore: evaluator against independent references, search determinism and resume,
configuration errors, reported figures recomputed from the emitted Verilog, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from appmult.errors import ConfigError, InvalidValueError
from appmult.explore import (Archive, Evaluator, ExploreConfig, genome_from_circuit, genome_from_netlist,
                             parse_budget, search, write_outputs)
from appmult.explore.search import _active_gates, _Mutator
from appmult.hdl import ExactMultiplier, NetlistMultiplier, TruncatedMultiplier
from appmult.lut_gen import error_metrics, exact_product
from appmult.lut_gen.metrics import metrics_under
from appmult.sim import Netlist, hardware_cost, synthesize
from conftest import exact


def _seed(width, signed, family=ExactMultiplier, **params):
    return genome_from_netlist(synthesize(family(width=width, signed=signed, **params)))


def _mutants(genome, n, seed=0, max_mutations=4):
    rng = np.random.default_rng(seed)
    mut = _Mutator(ExploreConfig(evaluations=1, max_mutations=max_mutations), rng)
    out, parent = [], genome
    for _ in range(n):
        child = mut.mutate(parent, _active_gates(parent))
        out.append(child)
        parent = child if rng.random() < 0.7 else parent
    return out


def _reference(values, width, signed, p_a=None, p_b=None):
    ex = exact_product(width, width, signed)
    lut = values.reshape(1 << width, 1 << width)
    if p_a is not None:
        return metrics_under(lut, ex, p_a, p_b)
    return error_metrics(lut, ex)


def _assert_matches(ev, ref):
    assert ev.mae_pct == pytest.approx(ref["mae_pct"], rel=1e-12, abs=1e-15)
    assert ev.wce == ref["wce"]
    assert ev.er_pct == pytest.approx(ref["er_pct"], rel=1e-12, abs=1e-15)
    assert ev.mre_pct == pytest.approx(ref["mre_pct"], rel=1e-9, abs=1e-12)
    assert ev.mse == pytest.approx(ref["mse"], rel=1e-12, abs=1e-15)


# -- the evaluator ------------------------------------------------------------------------------
@pytest.mark.parametrize("width,signed", [(4, False), (4, True), (5, True)])
def test_evaluator_outputs_equal_netlist_and_metrics_equal_lut_gen(width, signed):
    net = synthesize(TruncatedMultiplier(width=width, signed=signed, columns=3, compensate=True))
    genome = genome_from_netlist(net)
    ev = Evaluator(width, width, signed)
    np.testing.assert_array_equal(ev.outputs(genome), net.exhaustive().ravel())
    _assert_matches(ev.evaluate(genome), _reference(net.exhaustive(), width, signed))


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_mutants_compiled_numpy_incremental_and_lut_gen_agree(signed):
    genome = _seed(5, signed)
    compiled = Evaluator(5, 5, signed, lam=2)
    plain = Evaluator(5, 5, signed, use_numba=False)
    rng = np.random.default_rng(1)
    p_a, p_b = rng.random(32), rng.random(32) * (np.arange(32) % 3 != 0)
    weighted = Evaluator(5, 5, signed, p_a=p_a, p_b=p_b)
    compiled.set_parent(genome)
    for k, child in enumerate(_mutants(genome, 40)):
        values = compiled.outputs(child)
        ref = _reference(values, 5, signed)
        incremental = compiled.evaluate_child(child, k % 2)
        _assert_matches(incremental, ref)
        assert incremental == compiled.evaluate(child)
        _assert_matches(plain.evaluate(child), ref)
        _assert_matches(weighted.evaluate(child), _reference(values, 5, signed, p_a, p_b))
        if k % 3 == 0:
            compiled.accept(child, k % 2)


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_mutants_equal_yosys_resynthesis_of_their_verilog(tmp_path, signed):
    genome = _seed(4, signed)
    ev = Evaluator(4, 4, signed)
    for k, child in enumerate(_mutants(genome, 6, seed=7)[1::2]):
        circuit = child.to_circuit()
        path = tmp_path / f"m{k}.json"
        path.write_text(json.dumps(circuit))
        mult = NetlistMultiplier(path=path)
        # the circuit file, the search's evaluation and Yosys' re-synthesis agree
        np.testing.assert_array_equal(ev.outputs(genome_from_circuit(circuit)), ev.outputs(child))
        resynth = synthesize(mult).exhaustive()
        np.testing.assert_array_equal(resynth.ravel(), ev.outputs(child))
        a, b = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
        np.testing.assert_array_equal(mult.model(a, b), resynth)


def test_cost_estimate_equals_yosys_on_synthesized_netlists():
    for mult in (ExactMultiplier(width=4), TruncatedMultiplier(width=5, signed=True, columns=3)):
        net = synthesize(mult)
        figures = hardware_cost(net, relative=False, samples=256)
        est = genome_from_netlist(net).cost()
        assert {k: figures[k] for k in est} == est


def test_sampled_evaluation_of_wide_operands_is_labelled():
    ev = Evaluator(13, 3, False, samples=256, seed=3)
    assert not ev.exhaustive and ev.n_vectors == 256
    a, b = ev.vectors()
    assert {0, 8191}.issubset(set(a.tolist()))
    genome = _seed(4, False)  # wrong widths
    with pytest.raises(InvalidValueError, match=exact("A 4x4 unsigned circuit cannot be evaluated by a 13x3 "
                                                      "unsigned evaluator")):
        ev.evaluate(genome)


# -- the archive and the search -------------------------------------------------------------------
def test_archive_keeps_the_staircase():
    arch = Archive()
    for cost, err in [(10, 5), (8, 6), (12, 4), (9, 7), (10, 3), (20, 3), (7, 9)]:
        arch.offer(cost, err, (cost, err))
    assert arch.candidates() == [(7, 9), (8, 6), (10, 3)]


def _config(**kw):
    base = dict(evaluations=600, bounds=(0.5, 2.0, 5.0), seed=3, checkpoint_every=7)
    base.update(kw)
    return ExploreConfig(**base)


def _front(result):
    return [(c.cost["transistors"], c.evaluation.mae_pct, c.genome.to_state()) for c in result.front]


def test_search_is_deterministic_and_improves_cost():
    genome = _seed(4, False)
    r1 = search(genome, _config(), progress=False)
    r2 = search(genome, _config(), progress=False)
    assert _front(r1) == _front(r2)
    assert r1.evaluations == 600
    assert min(c.cost["transistors"] for c in r1.front) < genome.cost()["transistors"]
    assert all(c.evaluation.mae_pct <= 5.0 for c in r1.bests)
    assert _front(search(genome, _config(seed=4), progress=False)) != _front(r1)


def test_search_respects_constraints():
    genome = _seed(4, True)
    result = search(genome, _config(constraints=(("wce", 3.0),)), progress=False)
    assert result.front and all(c.evaluation.wce_pct <= 3.0 for c in result.front)


def test_resume_after_interruption_gives_the_same_front(tmp_path):
    genome = _seed(4, False)
    full = search(genome, _config(), progress=False)
    ckpt = tmp_path / "ckpt.json"

    def interrupt(info):
        if info["generation"] == 60:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        search(genome, _config(), checkpoint=ckpt, progress=False, on_generation=interrupt)
    assert json.loads(ckpt.read_text())["generation"] == 60
    resumed = search(genome, _config(), checkpoint=ckpt, resume=True, progress=False)
    assert _front(resumed) == _front(full)
    assert resumed.evaluations == full.evaluations


def test_resume_wrong(tmp_path):
    genome = _seed(3, False)
    with pytest.raises(InvalidValueError, match=exact(f"Cannot resume: no checkpoint file "
                                                      f"{str(tmp_path / 'c.json')!r}")):
        search(genome, _config(), checkpoint=tmp_path / "c.json", resume=True, progress=False)
    search(genome, _config(evaluations=40), checkpoint=tmp_path / "c.json", progress=False)
    with pytest.raises(InvalidValueError, match="belongs to another search"):
        search(genome, _config(evaluations=80), checkpoint=tmp_path / "c.json", resume=True, progress=False)


# -- configuration errors ------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,message", [
    (dict(error="mred"), "Unknown error objective 'mred'; choose one of mae, mre, wce, mse, er"),
    (dict(cost="area"), "Unknown cost figure 'area'; choose one of transistors, gates, aig_nodes, depth"),
    (dict(error="mse"), "Error objective 'mse' has no default bounds; give bounds"),
    (dict(bounds=(1.0, 0.5)), "Error bounds must be strictly increasing, not [1.0, 0.5]"),
    (dict(bounds=(-1.0,)), "Error bounds must be non-negative numbers, not (-1.0,)"),
    (dict(constraints=(("wcre", 1.0),)), "Unknown constraint metric 'wcre'; choose one of mae, mre, wce, mse, er"),
    (dict(constraints=(("wce", -1),)), "Constraint max_wce must be a non-negative number, not -1"),
    (dict(evaluations=None), "Give a budget: evaluations, a time budget (budget_s), or both"),
    (dict(evaluations=0), "evaluations must be an integer of at least 1, not 0"),
    (dict(budget_s=-5.0), "budget_s must be a positive number of seconds, not -5.0"),
    (dict(lam=0), "lam must be an integer of at least 1, not 0"),
    (dict(p_a=(0.0, 0.0)), "p_a must be non-negative weights with a positive sum"),
])
def test_config_wrong(kwargs, message):
    base = dict(evaluations=10)
    base.update(kwargs)
    with pytest.raises(ConfigError, match=exact(message)):
        ExploreConfig(**base)


def test_config_widths_wrong():
    with pytest.raises(ConfigError, match=exact("p_a has 3 entries; a 4-bit operand needs 16")):
        ExploreConfig(evaluations=1, p_a=(1, 2, 3)).check_widths(4, 4)


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("10m", 600), ("1.5h", 5400), ("45", 45), (2.5, 2.5)])
def test_parse_budget(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text,message", [
    ("10x", "Budget must be a duration like 90s, 10m or 1h, not '10x'"),
    ("0m", "Budget must be a positive duration, not '0m'"),
    ("", "Budget must be a duration like 90s, 10m or 1h, not ''"),
])
def test_parse_budget_wrong(text, message):
    with pytest.raises(InvalidValueError, match=exact(message)):
        parse_budget(text)


# -- reported circuits ------------------------------------------------------------------------------
def test_reported_figures_recomputed_from_emitted_verilog(tmp_path):
    genome = _seed(3, True)
    result = search(genome, _config(evaluations=300, bounds=(2.0, 8.0)), progress=False)
    doc = write_outputs(result, tmp_path, max_report=3, progress=False, seed_name="exact 3x3")
    assert 1 <= len(doc["found"]) <= 3
    for row in doc["found"]:
        net = Netlist.from_verilog(row["verilog"], signed=True)
        m = error_metrics(net.exhaustive(), exact_product(3, 3, True))
        for key in ("mae_pct", "wce_pct", "er_pct", "mre_pct", "mse"):
            assert row["metrics"][key] == pytest.approx(m[key], rel=1e-12, abs=1e-15)
        assert row["cost"]["transistors"] == hardware_cost(synthesize(NetlistMultiplier(path=row["circuit"])),
                                                           relative=False, samples=256)["transistors"]
    for name in ("front.json", "front.md", "pareto.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "front.json").read_text())["found"][0]["spec"].startswith("netlist:path=")


# -- the command line ----------------------------------------------------------------------------
def test_cli_explore(tmp_path, capsys):
    from appmult.cli import main
    out = tmp_path / "run"
    assert main(["explore", "--width", "3", "-o", str(out), "--evaluations", "200", "--bounds", "5,20",
                 "--report", "2", "--no-sweep", "-q"]) == 0
    assert "evaluations in" in capsys.readouterr().out
    assert (out / "checkpoint.json").exists() and (out / "front.md").exists()
    assert main(["explore", "--width", "3", "-o", str(out), "--evaluations", "200", "--bounds", "5,20",
                 "--report", "2", "--no-sweep", "-q", "--resume"]) == 0


def test_cli_explore_refuses_to_overwrite_a_run(tmp_path, capsys):
    """A second run into the same directory is refused unless --resume or --overwrite; with
    --overwrite the old run's circuit files go (a smaller front left stale cNNN files, not in
    its table: found by fuzzing the CLI) and the user's own files stay."""
    from appmult.cli import main
    out = tmp_path / "run"
    argv = ["explore", "--width", "3", "-o", str(out), "--evaluations", "200", "--bounds", "5,20", "--no-sweep", "-q"]
    assert main(argv + ["--report", "4"]) == 0
    before = (out / "front.json").read_bytes()
    capsys.readouterr()
    assert main(argv + ["--report", "1"]) == 2
    assert capsys.readouterr().err.strip() == (f"appmult explore: error: Output directory {out} already holds an "
                                               "explore run (checkpoint.json); pass --resume to continue it or "
                                               "--overwrite to replace it")
    assert (out / "front.json").read_bytes() == before
    assert main(argv + ["--report", "1", "--resume", "--overwrite"]) == 2
    assert "give one" in capsys.readouterr().err
    # --overwrite with an argument that fails its check later: the old run is still there
    assert main(argv + ["--report", "0", "--overwrite"]) == 2
    assert "--report must be at least 1" in capsys.readouterr().err
    assert (out / "front.json").read_bytes() == before and (out / "checkpoint.json").is_file()
    stale = sorted(p.name for p in (out / "circuits").iterdir())
    assert len(stale) > 2
    (out / "circuits" / "notes.txt").write_text("mine")
    (out / "mine.md").write_text("mine")
    assert main(argv + ["--report", "1", "--overwrite"]) == 0
    doc = json.loads((out / "front.json").read_text())
    listed = {Path(r["circuit"]).name for r in doc["found"]} | {Path(r["verilog"]).name for r in doc["found"]}
    assert sorted(p.name for p in (out / "circuits").iterdir()) == sorted(listed | {"notes.txt"})
    assert (out / "mine.md").read_text() == "mine"


@pytest.mark.parametrize("argv,message", [
    (["--width", "3", "--budget", "10x"], "Budget must be a duration like 90s, 10m or 1h, not '10x'"),
    (["--width", "3", "--evaluations", "5", "--error", "psnr"],
     "Unknown error objective 'psnr'; choose one of mae, mre, wce, mse, er"),
    (["--width", "3"], "Give a budget: evaluations, a time budget (budget_s), or both"),
    (["--evaluations", "5"], "Give a seed circuit (START) or --width (or --width-a and --width-b)"),
    (["--width", "3", "--evaluations", "5", "--bounds", "1,x"], "--bounds must be comma-separated numbers (no empty item), not '1,x'"),
])
def test_cli_explore_wrong(tmp_path, capsys, argv, message):
    from appmult.cli import main
    assert main(["explore", "-o", str(tmp_path), *argv]) == 2
    assert capsys.readouterr().err.strip() == f"appmult explore: error: {message}"


def test_chunked_evaluation_equals_one_chunk(monkeypatch):
    # Above 2**20 pairs (11- and 12-bit operands) the evaluator works chunk by chunk and
    # without the incremental shortcut; shrink the chunk to test that path at 5x5.
    from appmult.explore import evaluator as evaluator_module
    genome = _seed(5, True)
    whole = Evaluator(5, 5, True)
    monkeypatch.setattr(evaluator_module, "_CHUNK_LOG2", 7)
    chunked = Evaluator(5, 5, True, lam=2)
    assert not chunked.incremental and whole.incremental
    chunked.set_parent(genome)
    for child in _mutants(genome, 10, seed=5):
        np.testing.assert_array_equal(chunked.outputs(child), whole.outputs(child))
        got, want = vars(chunked.evaluate_child(child, 1)), vars(whole.evaluate(child))
        assert got == pytest.approx(want, rel=1e-12)  # float sums in another order
        chunked.accept(child, 1)


def test_thin_front_spreads_over_the_error_range():
    from appmult.explore import thin_front
    from appmult.explore.evaluator import Evaluation

    def cand(err):
        return type("C", (), {"evaluation": Evaluation(err, 0.0, 0, 0.0, 0.0, 0.0)})()

    front = [cand(0.0)] + [cand(10 ** (k / 10)) for k in range(-30, 11)]
    picked = thin_front(front, "mae", 8)
    assert picked[0] is front[0] and picked[-1] is front[-1]
    assert 6 <= len(picked) <= 9
