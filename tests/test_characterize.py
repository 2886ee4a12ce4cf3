"""Characterization: netlist simulation into LUTs, cache, LUT files, streamed metrics, CLI."""

from __future__ import annotations

import importlib
import json
import tracemalloc

import numpy as np
import pytest

import appmult.sim
from appmult.cli import main
from appmult.hdl import from_spec
from appmult.lut_gen import LutFile, error_metrics, exact_product, lut2d_gradients, metrics_under, ste_gradients
import appmult.flows.characterization as charmod
from appmult.lut_gen.characterization import Characterization
from appmult.flows import characterize, characterize_metrics

for _family in ("truncated", "drum", "mitchell", "perforated", "broken_array", "loa"):
    try:
        importlib.import_module(f"appmult.hdl.{_family}")
    except ImportError:
        pass


@pytest.fixture(autouse=True)
def lut_cache(tmp_path, monkeypatch):
    """A private LUT cache per test; the Yosys cache stays shared (and warm)."""
    path = tmp_path / "lutcache"
    monkeypatch.setattr(charmod, "lut_cache_dir", lambda: path)
    return path


def _spec(spec):
    family = spec.partition(":")[0]
    from appmult.hdl import FAMILIES
    if family not in FAMILIES:
        pytest.skip(f"family {family} is not available")
    return from_spec(spec)


@pytest.mark.parametrize("spec", ["exact:width=6,signed=true", "truncated:width=8,columns=4",
                                  "drum:width=6,k=3,signed=true", "broken_array:width_a=5,width_b=3,hbl=1,vbl=3"])
def test_product_is_netlist_and_model(spec):
    m = _spec(spec)
    c = characterize(m, progress=False, cost=False, cache=False)
    net = appmult.sim.synthesize(m)
    assert np.array_equal(c.product, net.exhaustive())
    a = np.arange(1 << m.width_a)[:, None]
    b = np.arange(1 << m.width_b)[None, :]
    assert np.array_equal(c.product, m.model(a, b))  # sanity only: LUTs never come from the model
    assert c.metrics == error_metrics(c.product, exact_product(m.width_a, m.width_b, m.signed))
    assert c.sha256_netlist == net.sha256_netlist and c.sha256_verilog == net.sha256_verilog


def test_cache_hit_does_not_resimulate(monkeypatch):
    calls = {"synthesize": 0, "chunks": 0}
    real_synth = appmult.sim.synthesize
    real_chunks = appmult.sim.Netlist.exhaustive_chunks

    def synth(*args, **kwargs):
        calls["synthesize"] += 1
        return real_synth(*args, **kwargs)

    def chunks(self, *args, **kwargs):
        calls["chunks"] += 1
        return real_chunks(self, *args, **kwargs)

    monkeypatch.setattr(appmult.sim, "synthesize", synth)
    monkeypatch.setattr(appmult.sim.Netlist, "exhaustive_chunks", chunks)
    spec = "truncated:width=6,columns=3"
    _spec(spec)
    first = characterize(spec, progress=False, cost=False)
    assert calls == {"synthesize": 1, "chunks": 1}
    second = characterize(spec, progress=False, cost=False)
    assert calls == {"synthesize": 1, "chunks": 1}
    assert np.array_equal(first.product, second.product) and first.metrics == second.metrics
    assert np.array_equal(first.gradient("lut2d")[0], second.gradient("lut2d")[0])
    characterize(spec, progress=False, cost=False, cache=False)
    assert calls == {"synthesize": 2, "chunks": 2}


def test_save_load_round_trip(tmp_path):
    c = characterize("exact:width_a=5,width_b=4,signed=true", progress=False, half_window=2)
    path = c.save(tmp_path / "lut.npz")
    lut = LutFile.load(path)
    assert np.array_equal(lut.product, c.product)
    assert set(lut.gradients) == {"ste", "lut2d", "lut1d"}
    assert lut.gradient("lut1d")[0].shape == (16,) and lut.gradient("lut1d")[1].shape == (32,)
    assert np.array_equal(lut.gradient("ste")[0], ste_gradients(5, 4, True)[0])
    assert np.array_equal(lut.gradient("lut2d")[1], lut2d_gradients(c.product, 5, 4, True, 2)[1])
    md = lut.metadata
    for key in ("spec", "family", "params", "width_a", "width_b", "signed", "sha256_verilog", "sha256_netlist",
                "tools", "metrics", "cost", "gradient_params"):
        assert key in md, key
    assert md["family"] == "exact" and md["spec"] == c.spec
    assert set(md["tools"]) >= {"appmult", "amaranth", "yosys", "numpy"}
    assert md["gradient_params"]["lut2d"] == {"half_window": 2, "half_window_choice": "explicit"}
    assert md["metrics"]["mre"] == 0 and md["cost"]["relative"]["transistors"] == 1.0
    back = Characterization.from_lutfile(path)
    assert back.half_window == 2 and back.metrics == c.metrics
    assert np.array_equal(back.gradient("lut2d")[0], c.gradient("lut2d")[0])


def test_gradient_api():
    c = characterize("truncated:width=6,columns=4", progress=False, cost=False, gradients=("lre",))
    h = c.half_window
    ga, gb = c.gradient("lut1d", compact=True)
    assert ga.shape == (64,) and gb.shape == (64,)
    fa, fb = c.gradient("lut1d")
    assert fa.shape == (64, 64) and np.array_equal(fa[3], ga)
    assert c.gradient("lre", compact=True)[0].shape == (64,)
    assert np.array_equal(c.gradient("lut2d")[0], c.gradient("lut2d", half_window=h)[0])
    assert c.gradient("ste")[0][5, 7] == 7
    rng = np.random.default_rng(0)
    ha, hb = rng.random(64), rng.random(64)
    assert c.metrics_under(ha, hb) == metrics_under(c.product, exact_product(6, 6, False), ha, hb)
    assert set(c.to_lutfile().gradients) == {"lre"}


def test_characterize_wrong():
    with pytest.raises(ValueError, match=r"^Half window must be one of 1, 2, 4, \.\.\., 64 or 'auto', not 3$"):
        characterize("exact:width=4", half_window=3)
    with pytest.raises(ValueError, match=r"^Gradient method must be one of ste, lut2d, lut1d, lre, not 'lut3d'$"):
        characterize("exact:width=4", gradients=("lut3d",))
    with pytest.raises(ValueError, match=r"^Full product LUTs are limited to 12x12 operands; "
                                         r"exact:width_a=13,width_b=2,signed=false is 13x2\. Use characterize_metrics"):
        characterize("exact:width_a=13,width_b=2")
    with pytest.raises(TypeError, match=r"^characterize takes a Multiplier, a Netlist or a spec string, not 42$"):
        characterize(42)
    c = characterize("exact:width=4", progress=False, cost=False, gradients=())
    with pytest.raises(ValueError, match=r"^Gradient method 'ste' takes no parameter\(s\) half_window$"):
        c.gradient("ste", half_window=2)
    with pytest.raises(ValueError, match=r"^Gradient method must be one of ste, lut2d, lut1d, lre, not 'x'$"):
        c.gradient("x")


def test_metrics_stream_matches_model():
    spec = "truncated:width_a=13,width_b=4,columns=3"
    m = _spec(spec)
    c = characterize_metrics(m, progress=False, cost=False, chunk_vectors=1 << 12,
                             hist_a=np.arange(1 << 13), hist_b=None)
    assert not c.has_product
    model = m.model(np.arange(1 << 13)[:, None], np.arange(16)[None, :])
    exact = exact_product(13, 4, False)
    assert c.metrics == error_metrics(model, exact)
    ref = metrics_under(model, exact, np.arange(1 << 13), np.ones(16))
    for key in ("er", "mae", "mre", "bias", "std", "wce"):
        assert c.metrics_weighted[key] == pytest.approx(ref[key], rel=1e-12), key
    with pytest.raises(ValueError, match=r"holds no product table"):
        c.metrics_under(np.ones(1 << 13), np.ones(16))
    again = characterize(m, product=False, progress=False, cost=False)  # cached
    assert again.metrics == c.metrics


@pytest.mark.slow
def test_16x16_metrics_bounded_memory():
    m = _spec("truncated:width=16,columns=20")
    tracemalloc.start()
    try:
        c = characterize_metrics(m, progress=False, cost=False, cache=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert c.metrics["pairs"] == 1 << 32
    assert peak < 600 * 2 ** 20, f"peak traced memory {peak / 2**20:.0f} MiB"
    # Dropping the 20 low columns only ever loses value: the error is never positive.
    assert c.metrics["wce"] > 0 and c.metrics["bias"] < 0 and c.metrics["bias"] == -c.metrics["mae"]


def test_cli_characterize(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["characterize", "truncated:width=6,columns=3,signed=true", "-o", str(out), "-q",
                 "--half-window", "2"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"lut.npz", "report.json", "report.md", "error_heatmap.png", "error_histogram.png",
            "gradient_tables.png", "gradient_curves.png"} <= names
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    assert report["gradient_params"]["lut2d"]["half_window"] == 2 and report["exact_metrics"]["mre"] == 0
    md = (out / "report.md").read_text()
    assert "| metric | this | exact |" in md and "| transistors |" in md
    assert LutFile.load(out / "lut.npz").width_a == 6
    assert "MRE" in capsys.readouterr().out


def test_cli_characterize_wrong(tmp_path, capsys):
    assert main(["characterize", "exact:width=4", "-o", str(tmp_path), "--half-window", "3"]) == 2
    assert "Half window must be one of 1, 2, 4, ..., 64 or 'auto', not 3" in capsys.readouterr().err


def test_cli_compare(tmp_path, capsys):
    assert main(["compare", "exact:width=6", "truncated:width=6,columns=4", "-o", str(tmp_path), "-q"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[0].split()[:4] == ["name", "er_pct", "nmed_pct", "mre_pct"]
    assert len(lines) == 4 and lines[2].startswith("exact:")
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert len(json.loads((tmp_path / "compare.json").read_text())) == 2
