"""The hardware proof on trained layers: ``verify_layer_rtl`` and ``appmult retrain --verify-rtl``.

The layers use LUTs characterized from real circuits; the RTL side is the exported MAC
unit in Icarus Verilog. The must-fail cases build the MAC from another circuit and check
that the mismatches name the right output positions with the right values.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from appmult.cli import main
from appmult.hdl import from_spec
from appmult.lut_gen import LutFile
from appmult.flows import characterize
from appmult.nn import ApproxConfig, ApproxConv2d, ApproxLinear, layer_operands
from appmult.flows.rtlcheck import RtlCheckError, _fill_pair, verify_layer_rtl
from appmult.tb import simulator_available

UNSIGNED = "drum:width=6,k=3"
SIGNED = "truncated:width=6,columns=4,signed=true"

_LUTS: dict[str, LutFile] = {}


def lut_of(spec: str) -> LutFile:
    if spec not in _LUTS:
        _LUTS[spec] = characterize(spec, gradients=(), progress=False, cost=False).to_lutfile()
    return _LUTS[spec]


def calibrated(layer, x):
    """The layer with its activation range observed on ``x``, then frozen (eval mode)."""
    layer.train()
    with torch.no_grad():
        layer(x)
    return layer.eval()


def conv(spec: str, *args, seed: int = 0, **kw) -> ApproxConv2d:
    torch.manual_seed(seed)
    return ApproxConv2d(*args, config=ApproxConfig(lut=lut_of(spec)), **kw)


# --- operand codes (no simulator) -----------------------------------------------------------------

@pytest.mark.parametrize("spec,kw", [
    (UNSIGNED, dict(padding=1)),
    (UNSIGNED, dict(padding=(2, 1), stride=2, dilation=(1, 2), groups=2)),
    (SIGNED, dict(padding=1, stride=(1, 2), groups=4)),
])
def test_operand_codes_reproduce_int_forward(spec, kw):
    layer = conv(spec, 4, 8, 3, **kw)
    x = torch.randn(2, 4, 7, 9) + 0.3
    calibrated(layer, x)
    ops = layer_operands(layer, x)
    sums = lut_of(spec).product.astype(np.int64)[ops.a, ops.b].sum(-1)
    assert np.array_equal(sums, layer.int_forward(x).numpy())
    assert ops.fan_in == 4 // kw.get("groups", 1) * 9
    assert ops.padded[0, 0, 0, 0] > 0  # the top-left corner reads padding


def test_operand_codes_follow_activation_operand_b():
    lut = lut_of(UNSIGNED)
    lin = ApproxLinear(5, 3, config=ApproxConfig(lut=lut, activation_operand="b"))
    x = torch.randn(4, 5)
    calibrated(lin, x)
    ops = layer_operands(lin, x)
    # Weights are on operand a: each output channel's row is the same for every input row.
    assert np.array_equal(ops.a[0], ops.a[3])
    assert np.array_equal(lut.product[ops.a, ops.b].sum(-1), lin.int_forward(x).numpy())


def test_fill_pair_has_product_zero_when_possible():
    table = np.arange(16).reshape(4, 4)
    assert _fill_pair(table) == (0, 0)
    table = table + 1
    table[2, 3] = 0
    assert _fill_pair(table) == (2, 3)
    table[2, 3] = -2
    assert _fill_pair(table) == (0, 0)  # no zero entry: the smallest |product| (1)


def test_lut_without_circuit_is_refused():
    plain = lut_of(UNSIGNED)
    bare = LutFile(plain.product, width_a=6, width_b=6, signed=False, metadata={})
    layer = ApproxConv2d(1, 2, 3, config=ApproxConfig(lut=bare))
    x = torch.rand(1, 1, 5, 5)
    with pytest.raises(RtlCheckError, match=re.escape(
            f"LUT {bare.lut_id} has no 'spec' in its metadata: it was not characterized from a circuit")):
        verify_layer_rtl(layer, x)


def test_multiplier_of_other_widths_is_refused():
    layer = conv(UNSIGNED, 1, 2, 3)
    lut = lut_of(UNSIGNED)
    with pytest.raises(RtlCheckError, match="^" + re.escape(
            f"Multiplier exact:width_a=8,width_b=8,signed=false is 8x8 unsigned but the layer's LUT "
            f"{lut.lut_id} is 6x6 unsigned") + "$"):
        verify_layer_rtl(layer, torch.rand(1, 1, 5, 5), multiplier=from_spec("exact:width=8"))


@pytest.mark.parametrize("kw,message", [
    (dict(positions=0), "positions must be at least 1, not 0"),
    (dict(positions=[(0, 0, 9, 0)]), "Position (0, 0, 9, 0) is outside the layer's output of shape (1, 2, 5, 5)"),
    (dict(lanes=0), "lanes must be a positive integer, not 0"),
])
def test_bad_arguments(kw, message):
    layer = conv(UNSIGNED, 1, 2, 3, padding=1)
    x = torch.rand(1, 1, 5, 5)
    calibrated(layer, x)
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        verify_layer_rtl(layer, x, **kw)


def test_not_an_approximate_layer():
    with pytest.raises(TypeError, match="^verify_layer_rtl needs an ApproxConv2d or ApproxLinear, not Conv2d$"):
        verify_layer_rtl(torch.nn.Conv2d(1, 1, 3), torch.rand(1, 1, 4, 4))


# --- in the simulator -----------------------------------------------------------------------------

@pytest.mark.simulator
@pytest.mark.skipif(not simulator_available("icarus"), reason="Icarus Verilog is not installed")
@pytest.mark.parametrize("spec", [UNSIGNED, SIGNED])
def test_trained_conv_matches_rtl(spec, tmp_path):
    layer = conv(spec, 3, 4, 3, padding=1)
    # Activations straddle 0: the unsigned zero point is a non-zero code, so padded
    # operands are that code, not 0.
    x = torch.randn(2, 3, 6, 6) + 0.5
    calibrated(layer, x)
    zx = float(layer.act_quant.scale_zero_point()[1])
    assert (zx != 0) == (spec == UNSIGNED)
    result = verify_layer_rtl(layer, x, positions=6, build_dir=tmp_path)
    assert result.passed, result.report()
    assert len(result.checks) == 6 and result.fan_in == 27
    assert (result.lanes, result.beats, result.fill_pairs, result.fill_product) == (8, 4, 5, 0)
    assert result.checks[0].position == (0, 0, 0, 0) and result.checks[0].padded_operands == 15
    ref = layer.int_forward(x)
    assert [c.expected for c in result.checks] == [int(ref[c.position]) for c in result.checks]
    assert result.summary().startswith("RTL check: 6 positions, 27 products each, all equal (ApproxConv2d, ")
    assert json.loads(json.dumps(result.to_dict()))["mismatch_count"] == 0


@pytest.mark.simulator
@pytest.mark.skipif(not simulator_available("icarus"), reason="Icarus Verilog is not installed")
def test_linear_with_activation_on_operand_b_matches_rtl(tmp_path):
    lin = ApproxLinear(10, 3, config=ApproxConfig(lut=lut_of(UNSIGNED), activation_operand="b"))
    x = torch.randn(5, 10)
    calibrated(lin, x)
    result = verify_layer_rtl(lin, x, positions=[(0, 0), (4, 2), (2, 1)], lanes=4, build_dir=tmp_path)
    assert result.passed, result.report()
    assert [c.position for c in result.checks] == [(0, 0), (4, 2), (2, 1)]
    assert (result.fan_in, result.beats, result.fill_pairs) == (10, 3, 2)


@pytest.mark.simulator
@pytest.mark.skipif(not simulator_available("icarus"), reason="Icarus Verilog is not installed")
def test_other_circuit_is_caught_at_the_right_positions(tmp_path):
    # Non-negative activations (zero point 0): a receptive field of zeros sums to 0 for
    # both circuits, so only the outputs that see the bright 2x2 patch can differ.
    layer = conv(UNSIGNED, 1, 2, 3, padding=1, seed=3)
    x = torch.zeros(1, 1, 6, 6)
    x[0, 0, 1:3, 1:3] = torch.tensor([[0.9, 0.7], [0.55, 1.0]])
    calibrated(layer, x)
    assert float(layer.act_quant.scale_zero_point()[1]) == 0
    positions = [(0, 0, 0, 0), (0, 1, 2, 2), (0, 0, 5, 5), (0, 1, 4, 4), (0, 0, 3, 1)]
    exact = from_spec("exact:width=6")
    result = verify_layer_rtl(layer, x, positions=positions, multiplier=exact, build_dir=tmp_path)
    assert not result.passed
    # Outputs (y, x) see pixels y-1..y+1, x-1..x+1: the patch (rows/cols 1-2) reaches y, x in 0..3.
    assert [c.position for c in result.mismatches] == [(0, 0, 0, 0), (0, 1, 2, 2), (0, 0, 3, 1)]
    ops = layer_operands(layer, x)
    exact_lut = lut_of("exact:width=6").product.astype(np.int64)
    ref = layer.int_forward(x)
    for c in result.checks:
        assert c.expected == int(ref[c.position])
        assert c.actual == int(exact_lut[ops.a[c.position], ops.b[c.position]].sum())
    assert result.summary().startswith("RTL check: 5 positions, 9 products each, 3 of 5 differ")
    assert "  position (0, 1, 2, 2): int_forward " in result.report()


# --- appmult retrain --verify-rtl -------------------------------------------------------------------

@pytest.fixture(scope="module")
def lut_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("lut") / "drum6.npz"
    characterize(UNSIGNED, progress=False, cost=False).save(path)
    return path


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("pretrained")


def retrain_cli(capsys, lut_path, pretrained_dir, out, *extra):
    # The smallest LeNet-5 run: large batches keep the two epochs to a few seconds.
    rc = main(["retrain", "--lut", str(lut_path), "--model", "lenet5", "--dataset", "digits", "--epochs", "1",
               "--pretrain-epochs", "1", "--batch-size", "256", "--grad", "ste", "--out", str(out),
               "--pretrained-dir", str(pretrained_dir), "--calib-batches", "1", "--threads", "2",
               "--no-time-exact", "--verify-rtl", "--rtl-positions", "4", *extra])
    return rc, capsys.readouterr().err


@pytest.mark.simulator
@pytest.mark.skipif(not simulator_available("icarus"), reason="Icarus Verilog is not installed")
def test_retrain_cli_records_rtl_check(lut_path, pretrained_dir, tmp_path, capsys):
    rc, err = retrain_cli(capsys, lut_path, pretrained_dir, tmp_path / "run")
    assert rc == 0, err
    rtl = json.loads((tmp_path / "run" / "results.json").read_text())["modes"]["ste"]["rtl_check"]
    assert rtl["passed"] and rtl["mismatch_count"] == 0
    assert rtl["layer_name"] == "features.0" and rtl["images"] == 4 and len(rtl["checks"]) == 4
    assert rtl["fan_in"] == 25
    assert rtl["checks"][0]["padded_operands"] > 0
    assert rtl["summary"].startswith("RTL check: 4 positions, 25 products each, all equal")
    md = (tmp_path / "run" / "results.md").read_text()
    assert "- ste, layer `features.0`: RTL check: 4 positions, 25 products each, all equal" in md


@pytest.mark.simulator
@pytest.mark.skipif(not simulator_available("icarus"), reason="Icarus Verilog is not installed")
def test_retrain_cli_fails_on_rtl_mismatch(lut_path, pretrained_dir, tmp_path, capsys, monkeypatch):
    import appmult.flows.rtlcheck as rtlcheck
    original = rtlcheck.verify_layer_rtl

    def other_circuit(layer, x, **kw):
        return original(layer, x, multiplier=from_spec("exact:width=6"), **kw)

    monkeypatch.setattr(rtlcheck, "verify_layer_rtl", other_circuit)
    rc, err = retrain_cli(capsys, lut_path, pretrained_dir, tmp_path / "run", "--no-progress")
    assert rc == 1
    rtl = json.loads((tmp_path / "run" / "results.json").read_text())["modes"]["ste"]["rtl_check"]
    assert not rtl["passed"] and rtl["mismatch_count"] > 0
    assert "appmult retrain: error: ste: RTL check: 4 positions, 25 products each, " in err
    assert re.search(r"^  position \(\d+, \d+, \d+, \d+\): int_forward -?\d+, RTL -?\d+$", err, re.MULTILINE)


def test_retrain_cli_refuses_lut_without_circuit(tmp_path, capsys):
    plain = lut_of(UNSIGNED)
    bare = LutFile(plain.product, width_a=6, width_b=6, signed=False, metadata={})
    bare.save(tmp_path / "bare.npz")
    rc = main(["retrain", "--lut", str(tmp_path / "bare.npz"), "--out", str(tmp_path / "o"), "--verify-rtl",
               "--no-progress"])
    assert rc == 2
    assert capsys.readouterr().err == (f"appmult retrain: error: --verify-rtl needs a LUT characterized from a "
                                       f"circuit; LUT {bare.lut_id} has no 'spec' in its metadata\n")


@pytest.mark.simulator
@pytest.mark.skipif(not simulator_available("icarus"), reason="Icarus Verilog is not installed")
def test_accumulator_sized_for_the_circuit_not_only_the_lut(tmp_path):
    # Sized from the LUT alone (a perforated table whose sums stay small), the exact circuit's sum
    # of 8 x (-1 x -1 ... ) = 512 wrapped to 0 in the chosen accumulator and the check said "all equal".
    lut = characterize("perforated:width=4,signed=true,rows=[1,2,3]", gradients=(), progress=False,
                       cost=False).to_lutfile()
    layer = ApproxLinear(8, 1, bias=False, config=ApproxConfig(lut=lut))
    with torch.no_grad():
        layer.weight.fill_(-1.0)
    x = torch.full((2, 8), -1.0)
    layer.train()
    layer(x)
    layer.eval()
    exact = from_spec("exact:width=4,signed=true")
    result = verify_layer_rtl(layer, x, multiplier=exact, build_dir=tmp_path)
    assert not result.passed
    ops = layer_operands(layer, x)
    exact_lut = characterize("exact:width=4,signed=true", gradients=(), progress=False, cost=False).product
    for c in result.checks:
        assert c.expected == int(layer.int_forward(x)[c.position])
        assert c.actual == int(exact_lut[ops.a[c.position], ops.b[c.position]].astype(np.int64).sum())
