"""The network-aware exploration (appmult.flows.explore) and the search's start circuits.

The fast test stubs the two training steps (pretraining and retraining) and checks the
wiring: histograms from the converted model, the weighted search, the shortlist, the
choice, the RTL check and the files. The slow one trains for real on digits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from appmult.errors import ConfigError, InvalidValueError
from appmult.explore import ExploreConfig, genome_from_netlist, search
from appmult.hdl import ExactMultiplier, TruncatedMultiplier
from appmult.sim import synthesize
from conftest import exact


def _genome(width, family=ExactMultiplier, **params):
    return genome_from_netlist(synthesize(family(width=width, signed=False, **params)))


# -- start circuits ---------------------------------------------------------------------------------
def test_search_starts_each_bound_from_the_fittest_start():
    seed = _genome(4)
    start = _genome(4, TruncatedMultiplier, columns=3)  # MAE about 1.6% of 2**8
    cfg = ExploreConfig(evaluations=120, bounds=(0.1, 3.0), seed=1)
    plain = search(seed, cfg, progress=False)
    seeded = search(seed, cfg, starts=[start], progress=False)
    assert seeded.bests[-1].cost["transistors"] <= start.cost()["transistors"]
    assert seeded.bests[-1].cost["transistors"] < plain.bests[-1].cost["transistors"]
    again = search(seed, cfg, starts=[start], progress=False)
    assert [c.genome.to_state() for c in again.front] == [c.genome.to_state() for c in seeded.front]


def test_search_with_starts_resumes_to_the_same_front(tmp_path):
    seed, start = _genome(4), _genome(4, TruncatedMultiplier, columns=2)
    cfg = ExploreConfig(evaluations=400, bounds=(0.5, 2.0), seed=2, checkpoint_every=5)
    full = search(seed, cfg, starts=[start], progress=False)

    def interrupt(info):
        if info["generation"] == 60:  # in the second bound
            raise KeyboardInterrupt

    ckpt = tmp_path / "c.json"
    with pytest.raises(KeyboardInterrupt):
        search(seed, cfg, starts=[start], checkpoint=ckpt, progress=False, on_generation=interrupt)
    with pytest.raises(InvalidValueError, match="belongs to another search"):
        search(seed, cfg, checkpoint=ckpt, resume=True, progress=False)  # starts are part of the identity
    resumed = search(seed, cfg, starts=[start], checkpoint=ckpt, resume=True, progress=False)
    assert [c.genome.to_state() for c in resumed.front] == [c.genome.to_state() for c in full.front]


def test_search_starts_wrong():
    with pytest.raises(InvalidValueError, match=exact("Every start circuit must have the seed's widths and "
                                                      "signedness")):
        search(_genome(4), ExploreConfig(evaluations=10), starts=[_genome(3)], progress=False)


# -- the network-aware flow -------------------------------------------------------------------------
def _stub_training(monkeypatch, tmp_path):
    """Pretraining: a seeded untrained LeNet-5; retraining: an accuracy that falls with the error."""
    torch = pytest.importorskip("torch")
    from appmult.flows import explore as flow
    from appmult.train import DATASETS, Pretrained, build_model
    calls = []

    def pretrained(cfg):
        torch.manual_seed(0)
        model = build_model(cfg.model, DATASETS[cfg.dataset])
        path = tmp_path / "fp32.pt"
        torch.save(model.state_dict(), path)
        return Pretrained(model, [], path)

    def retrain(cfg, checkpoint, row):
        calls.append(row["name"])
        err = row["metrics"]["mae_pct"]
        return {"before": 50.0, "after": 90.0 - 10 * err, "exact_quantized_run": 90.0, "out": "x"}

    monkeypatch.setattr(flow, "_pretrained", pretrained)
    monkeypatch.setattr(flow, "_retrain", retrain)
    return calls


def test_network_explore_wiring(tmp_path, monkeypatch, one_torch_thread):
    from appmult.flows.explore import NetworkExploreConfig, run_network_explore
    calls = _stub_training(monkeypatch, tmp_path)
    cfg = NetworkExploreConfig(out=str(tmp_path / "net"), search=ExploreConfig(evaluations=1500, bounds=(1.0, 4.0)),
                               model="lenet5", dataset="digits", width=4, target_accuracy=80.0, shortlist=2,
                               family_shortlist=2, neighbours=1, record_batches=2, family_starts=True,
                               verify=False, progress=False)
    res = run_network_explore(cfg)
    hist = np.load(tmp_path / "net" / "hist.npz")
    assert hist["p_a"].shape == hist["p_b"].shape == (16,)
    assert hist["p_a"].sum() == pytest.approx(1.0) and hist["p_b"].sum() == pytest.approx(1.0)
    assert json.loads((tmp_path / "net" / "search" / "front.json").read_text())["config"]["p_a"] is True
    rows = res["candidates"]
    assert calls[0] == "exact" and res["reference"]["accuracy_after"] == 90.0
    assert sorted(r["name"] for r in rows) == sorted(calls[1:]) and 1 <= len(rows) <= 6
    assert [r["transistors"] for r in rows] == sorted(r["transistors"] for r in rows)
    assert all(0 < r["error"] <= 4.0 for r in rows)
    assert all(r["meets_target"] == (r["accuracy_after"] >= 80.0) for r in rows)
    ok = [r for r in rows if r["meets_target"]]
    assert res["chosen"] == (min(ok, key=lambda r: (r["transistors"], r["error"])) if ok else None)
    assert res["verification"] is None  # verify=False here; the slow test runs the RTL check
    for name in ("network.json", "network.md", "accuracy.png"):
        assert (tmp_path / "net" / name).stat().st_size > 0


@pytest.mark.parametrize("kwargs,message", [
    (dict(model="vgg"), "Unknown model 'vgg'; choose one of {models}"),
    (dict(dataset="imagenet"), "Unknown dataset 'imagenet'; choose one of {datasets}"),
    (dict(width=16), "width must be at most 12 (exhaustive LUTs), not 16"),
    (dict(epochs=0), "epochs must be an integer of at least 1, not 0"),
    (dict(target_accuracy=150), "target_accuracy must be a percentage in (0, 100], not 150"),
    (dict(max_drop=-1), "max_drop must be a non-negative number of percentage points, not -1"),
    (dict(grad="lut3d"), "Unknown gradient mode 'lut3d'; choose one of ste, lut2d, lut1d"),
    (dict(shortlist=0, family_shortlist=0), "Nothing to retrain: shortlist and family_shortlist are both 0"),
    (dict(neighbours=-1), "neighbours must be an integer of at least 0, not -1"),
    (dict(sweep=False, family_starts=True), "family_starts needs the family sweep (sweep=True)"),
    # refused here, not by the retraining after the whole search
    (dict(dataset="digits", data_dir="/tmp"), "Dataset 'digits' ships inside a Python package and reads no "
                                              "--data-dir (only 'mnist', 'cifar10', 'cifar100' do); leave --data-dir out"),
])
def test_network_config_wrong(kwargs, message):
    from appmult.flows.explore import NetworkExploreConfig
    from appmult.train import DATASETS, MODEL_NAMES
    message = message.format(models=", ".join(MODEL_NAMES), datasets=", ".join(DATASETS))
    with pytest.raises(ConfigError, match=exact(message)):
        NetworkExploreConfig(out="x", search=ExploreConfig(evaluations=10), **kwargs)


def test_cli_network_mode_wrong(tmp_path, capsys):
    from appmult.cli import main
    assert main(["explore", "exact:width=4", "-o", str(tmp_path), "--evaluations", "10", "--model", "mlp"]) == 2
    assert capsys.readouterr().err.strip() == ("appmult explore: error: --model searches from the exact unsigned "
                                               "multiplier of --width; drop START, --width-a/--width-b and --signed")


@pytest.mark.slow
def test_network_explore_trains_for_real(tmp_path, one_torch_thread):
    from appmult.cli import main
    out = tmp_path / "net"
    assert main(["explore", "--model", "mlp", "--dataset", "digits", "--width", "4", "-o", str(out),
                 "--evaluations", "1500", "--bounds", "0.5,2", "--pretrain-epochs", "2", "--epochs", "1",
                 "--shortlist", "1", "--family-shortlist", "1", "--neighbours", "1", "--max-drop", "100",
                 "-q"]) == 0
    res = json.loads((out / "network.json").read_text())
    assert res["chosen"] is not None and res["verification"]["status"] in ("passed", "skipped")
    assert all((Path(r["retrain_dir"]) / "results.json").is_file() for r in res["candidates"])


def test_cli_family_starts_wrong(tmp_path, capsys):
    from appmult.cli import main
    assert main(["explore", "--width", "3", "-o", str(tmp_path), "--evaluations", "10", "--no-sweep",
                 "--family-starts", "-q"]) == 2
    assert capsys.readouterr().err.strip() == ("appmult explore: error: --family-starts needs the family sweep "
                                               "(drop --no-sweep)")


def test_bisection_finds_the_last_circuit_that_meets_the_target(monkeypatch):
    from appmult.flows import explore as flow
    front = [{"name": f"r{i}", "metrics": {"mae_pct": 0.1 * (i + 1)}} for i in range(20)]
    seen = []

    def row(cfg, checkpoint, key, r, threshold):
        seen.append(r["name"])
        return {"name": r["name"], "meets_target": r["metrics"][key] <= 0.75}

    monkeypatch.setattr(flow, "_row", row)
    rows = flow._bisect(None, None, "mae_pct", front, 10, 80.0)
    assert [r["name"] for r in rows] == seen and len(rows) <= 5  # log2(20) retrainings suffice
    assert max((r for r in rows if r["meets_target"]), key=lambda r: int(r["name"][1:]))["name"] == "r6"
    assert "r7" in seen and not next(r for r in rows if r["name"] == "r7")["meets_target"]
    seen.clear()
    assert len(flow._bisect(None, None, "mae_pct", front, 2, 80.0)) == 2


def _accuracy_row(passing, seen):
    def row(cfg, checkpoint, key, r, threshold):
        seen.append(r["name"])
        return {"name": r["name"], "meets_target": r["name"] in passing}
    return row


def test_neighbours_find_a_cheaper_circuit_the_bisection_skipped(monkeypatch):
    # Accuracy that does not fall monotonically along the front: r6 fails, r7 passes again.
    from appmult.flows import explore as flow
    front = [{"name": f"r{i}", "metrics": {"mae_pct": 0.1 * (i + 1)}} for i in range(20)]
    passing = {"r0", "r1", "r2", "r3", "r4", "r5", "r7"}
    seen = []
    monkeypatch.setattr(flow, "_row", _accuracy_row(passing, seen))
    plain = flow._bisect(None, None, "mae_pct", front, 10, 80.0)
    assert "r7" not in seen and max(int(r["name"][1:]) for r in plain if r["meets_target"]) == 5
    seen.clear()
    rows = flow._bisect(None, None, "mae_pct", front, 10, 80.0, neighbours=2)
    # The bisection retrains r9, r4, r6, r5 (r5 passes, r6 fails); the two nearest cheaper
    # members not retrained yet are r7 and r8, in that order, after the bisection.
    assert seen[:len(plain)] == [r["name"] for r in plain] and seen[len(plain):] == ["r7", "r8"]
    assert [r["name"] for r in rows] == seen and len(set(seen)) == len(seen)
    assert max(int(r["name"][1:]) for r in rows if r["meets_target"]) == 7


def test_neighbours_without_a_passing_circuit_start_at_the_front(monkeypatch):
    from appmult.flows import explore as flow
    front = [{"name": f"r{i}", "metrics": {"mae_pct": 0.1 * (i + 1)}} for i in range(8)]
    seen = []
    monkeypatch.setattr(flow, "_row", _accuracy_row({"r1"}, seen))
    rows = flow._bisect(None, None, "mae_pct", front, 2, 80.0, neighbours=3)
    # The bisection: r3 fails, r1 passes (limit 2 reached); then r2, r4, r5 (r3 is done).
    assert seen == ["r3", "r1", "r2", "r4", "r5"] and [r["name"] for r in rows] == seen
    seen.clear()
    monkeypatch.setattr(flow, "_row", _accuracy_row(set(), seen))
    flow._bisect(None, None, "mae_pct", front, 3, 80.0, neighbours=2)
    assert seen == ["r3", "r1", "r0", "r2", "r4"]
    seen.clear()
    assert flow._bisect(None, None, "mae_pct", front, 0, 80.0, neighbours=2) == [] and seen == []
