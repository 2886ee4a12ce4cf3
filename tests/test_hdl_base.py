"""Base class, spec strings, codes and export: behaviour and error messages."""

import itertools

import numpy as np
import pytest

from appmult.codes import codes_by_value, codes_to_values, values_to_codes, wrap_value
from appmult.hdl import ExactMultiplier, export_verilog, format_spec, from_spec, parse_spec


@pytest.mark.parametrize("width,signed", [(4, False), (4, True), (8, True), (3, False)])
def test_codes_round_trip(width, signed):
    codes = np.arange(1 << width)
    values = codes_to_values(codes, width, signed)
    assert (values_to_codes(values, width, signed) == codes).all()
    if signed:
        assert values.min() == -(1 << (width - 1))
        assert values[1 << (width - 1)] == -(1 << (width - 1))  # the most negative code
    order = codes_by_value(width, signed)
    assert (np.diff(codes_to_values(order, width, signed)) == 1).all()


def test_codes_wrong():
    with pytest.raises(ValueError, match=r"Operand code 16 is out of range for a 4-bit operand \(0..15\)"):
        codes_to_values([16], 4, False)
    with pytest.raises(ValueError, match=r"Value -9 does not fit a 4-bit signed operand \(-8..7\)"):
        values_to_codes([-9], 4, True)
    with pytest.raises(TypeError, match="Operand codes must be integers, not float64"):
        codes_to_values([1.5], 4, False)


def test_wrap_value():
    assert wrap_value(np.array([256, -1, 127, 128]), 8, True).tolist() == [0, -1, 127, -128]
    assert wrap_value(np.array([256, -1]), 8, False).tolist() == [0, 255]


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("wa,wb", [(4, 4), (6, 3), (2, 5)])
def test_exact_model_is_true_product(wa, wb, signed):
    m = ExactMultiplier(width_a=wa, width_b=wb, signed=signed)
    a, b = np.meshgrid(np.arange(1 << wa), np.arange(1 << wb), indexing="ij")
    va, vb = codes_to_values(a, wa, signed), codes_to_values(b, wb, signed)
    assert (m.model(a, b) == va * vb).all()
    # The Baugh-Wooley partial-product expansion (what the circuit builds) agrees too.
    from appmult.hdl import PartialProductMultiplier
    pp = wrap_value(PartialProductMultiplier._model(m, a, b), wa + wb, signed)
    assert (pp == va * vb).all()


def test_widths():
    m = ExactMultiplier(width_a=6, width_b=3, signed=True)
    assert (m.width_a, m.width_b, m.width_p, m.signed) == (6, 3, 9, True)
    assert ExactMultiplier(width=5).width_b == 5


def test_widths_wrong():
    with pytest.raises(TypeError, match=r"Operand width width_a must be an integer in 2..16, not 17"):
        ExactMultiplier(width_a=17, width_b=4)
    with pytest.raises(TypeError, match=r"Operand width width must be an integer in 2..16, not 1"):
        ExactMultiplier(width=1)
    with pytest.raises(TypeError, match=r"Operand width width_b must be an integer in 2..16, not True"):
        ExactMultiplier(width_a=4, width_b=True)
    with pytest.raises(ValueError, match=r"Give either width or width_a, not both with different values"):
        ExactMultiplier(width=4, width_a=5)
    with pytest.raises(ValueError, match=r"Operand widths are required"):
        ExactMultiplier()
    with pytest.raises(TypeError, match=r"signed must be a bool, not 'yes'"):
        ExactMultiplier(width=4, signed="yes")


def test_model_wrong():
    m = ExactMultiplier(width=4)
    with pytest.raises(ValueError, match=r"Operand code 16 is out of range for a 4-bit operand"):
        m.model([16], [0])


def test_spec_round_trip():
    m = from_spec("exact:width_a=8,width_b=4,signed=true")
    assert (m.width_a, m.width_b, m.signed) == (8, 4, True)
    assert format_spec(m) == "exact:width_a=8,width_b=4,signed=true"
    again = from_spec(m.spec)
    assert again.describe() == m.describe()
    cls, kwargs = parse_spec(" EXACT : width = 8 ")
    assert cls is ExactMultiplier and kwargs == {"width": 8}


@pytest.mark.parametrize("spec,message", [
    ("nosuch:width=8", r"Unknown multiplier family 'nosuch'; known families: exact"),
    ("exact:width=8,colums=2", r"Unknown key 'colums' for family 'exact'; valid keys: width, width_a, width_b, signed"),
    ("exact:width=eight", r"Spec value for exact parameter width must be an integer, not 'eight'"),
    ("exact:width=8,signed=maybe", r"Spec value for exact parameter signed must be true or false, not 'maybe'"),
    ("exact:width=8,width=4", r"Key 'width' is given twice"),
    ("exact:width", r"Spec item 'width' must be key=value"),
    ("exact", r"Spec 'exact' gives no width"),
    ("", r"A multiplier spec must be a non-empty string"),
    ("exact:width=[8", r"Unbalanced '\['"),
])
def test_spec_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        from_spec(spec)


def test_export_verilog():
    m = ExactMultiplier(width_a=4, width_b=3, signed=True)
    text = export_verilog(m, name="mul4x3")
    assert "module mul4x3(" in text
    # Amaranth's Verilog ports carry raw bit patterns (no `signed`): codes, as DESIGN says.
    assert "input [3:0] a;" in text and "input [2:0] b;" in text
    assert "output [6:0] p;" in text
    assert "clk" not in text
    reg = export_verilog(m, name="mul4x3r", registered=True)
    assert "input clk;" in reg and "input rst;" in reg and "always @(posedge clk)" in reg


def test_export_verilog_wrong():
    m = ExactMultiplier(width=4)
    with pytest.raises(ValueError, match=r"Module name must be a Verilog identifier, not '4bad'"):
        export_verilog(m, name="4bad")
    with pytest.raises(TypeError, match=r"export_verilog takes an Amaranth wiring.Component"):
        export_verilog("exact", name="x")


def test_cli_export(tmp_path, capsys):
    from appmult.cli import main
    out = tmp_path / "m.v"
    assert main(["export", "exact:width=4,signed=true", "-o", str(out), "--name", "m4", "--registered"]) == 0
    text = out.read_text()
    assert "module m4(" in text and "input clk;" in text
    assert main(["export", "nosuch:width=4"]) == 2
    assert "Unknown multiplier family 'nosuch'" in capsys.readouterr().err
    assert main(["list"]) == 0
    assert "exact" in capsys.readouterr().out
