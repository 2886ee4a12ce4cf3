"""The `netlist` family: a stored gate list as a first-class multiplier (spec, model, synthesis)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from appmult.errors import InvalidValueError, MissingFileError, SpecError
from appmult.hdl import (CIRCUIT_FORMAT, ExactMultiplier, NetlistMultiplier, check_circuit, circuit_digest,
                         from_spec)
from appmult.sim import synthesize
from appmult.explore import genome_from_netlist
from conftest import exact


def _circuit(tmp_path, width=3, signed=False, name="c.json", **extra):
    net = synthesize(ExactMultiplier(width=width, signed=signed))
    circuit = genome_from_netlist(net).to_circuit(metadata={"note": "test"})
    circuit.update(extra)
    path = tmp_path / name
    path.write_text(json.dumps(circuit))
    return path, circuit


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_netlist_family_from_spec_synthesizes_to_its_model(tmp_path, signed):
    path, circuit = _circuit(tmp_path, 4, signed)
    m = from_spec(f"netlist:path={path}")
    assert (m.width_a, m.width_b, m.signed) == (4, 4, signed)
    assert m.spec == (f"netlist:width_a=4,width_b=4,signed={str(signed).lower()},path={path},"
                      f"digest={circuit_digest(circuit)[:16]}")
    assert from_spec(m.spec).digest == m.digest
    a, b = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    lut = synthesize(m).exhaustive()
    np.testing.assert_array_equal(lut, m.model(a, b))
    np.testing.assert_array_equal(lut, ExactMultiplier(width=4, signed=signed).model(a, b))
    assert m.metadata == {"note": "test"}


def test_netlist_family_digest_ignores_metadata(tmp_path):
    _, c1 = _circuit(tmp_path, name="x.json")
    assert circuit_digest(c1) == circuit_digest({**c1, "metadata": {"other": 1}})


def test_netlist_family_wrong(tmp_path):
    path, circuit = _circuit(tmp_path)
    with pytest.raises(InvalidValueError, match=exact(
            f"Circuit {str(path)!r} has digest {circuit_digest(circuit)[:16]}, not '0123456789abcdef': "
            "the file changed since the spec was written")):
        from_spec(f"netlist:path={path},digest=0123456789abcdef")
    full = circuit_digest(circuit)
    with pytest.raises(InvalidValueError, match=exact(  # a true prefix, too short: not "the file changed"
            f"Netlist digest {full[:7]!r} is too short: give at least 8 hex digits of {full[:16]} (the circuit's "
            "digest)")):
        from_spec(f"netlist:path={path},digest={full[:7]}")
    with pytest.raises(InvalidValueError, match=exact(f"Circuit {str(path)!r} has width_a=3, not 4")):
        from_spec(f"netlist:path={path},width=4")
    with pytest.raises(InvalidValueError, match=exact(f"Circuit {str(path)!r} has signed=False, not True")):
        from_spec(f"netlist:path={path},signed=true")
    with pytest.raises(MissingFileError, match=exact("Circuit file 'nope.json' does not exist")):
        from_spec("netlist:path=nope.json")
    with pytest.raises(SpecError, match=exact("Spec value for netlist parameter path must be text without "
                                              "commas or brackets, not 'a[1].json'")):
        from_spec("netlist:path=a[1].json")
    with pytest.raises(TypeError, match=exact("Netlist path must be a file name, not None")):
        NetlistMultiplier()


@pytest.mark.parametrize("change,message", [
    ({"format": "x"}, f"not an appmult circuit (expected \"format\": \"{CIRCUIT_FORMAT}\")"),
    ({"version": 2}, "version 2 is not supported (expected 1)"),
    ({"width_a": 1}, "width_a must be an integer in 2..16, not 1"),
    ({"signed": 0}, "signed must be true or false, not 0"),
    ({"gates": [["and", 2]]}, "gate 0 (node 8): and takes 2 inputs, not 1"),
    ({"gates": [["nand3", 2, 3]]}, "gate 0 (node 8) must be [op, inputs...] with op one of buf, not, and, or, "
                                   "xor, nand, nor, xnor, andnot, ornot, mux, not ['nand3', 2, 3]"),
    ({"gates": [["and", 2, 8]]}, "gate 0 (node 8) reads 8; a gate reads nodes 0..7"),
    ({"gates": [], "outputs": [0] * 5}, "outputs must list 6 nodes (width_a + width_b), not 5"),
    ({"gates": [], "outputs": [0] * 5 + [8]}, "output node 8 is not a node 0..7"),
])
def test_check_circuit_wrong(change, message):
    base = {"format": CIRCUIT_FORMAT, "version": 1, "width_a": 3, "width_b": 3, "signed": False,
            "gates": [], "outputs": [0] * 6}
    with pytest.raises(InvalidValueError, match=exact(f"Circuit data: {message}")):
        check_circuit({**base, **change})


def test_netlist_family_not_in_parametric_listing():
    from appmult.explore import family_grid
    assert all(m.family != "netlist" for m in family_grid(4, 4, False))
    assert NetlistMultiplier.FILE_BACKED
