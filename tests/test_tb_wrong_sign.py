"""appmult.tb: a LUT entry with the right magnitude and the wrong sign is a mismatch.

The other must-fail tests change a product's magnitude; a testbench that compared
``|RTL|`` with ``|LUT|`` (or dropped the sign bit) would still pass them. Here one entry
of a signed LUT is negated -- a valid LUT file, same magnitudes everywhere -- and the
testbench must report exactly that pair, with the RTL's true (signed) value.
"""

from __future__ import annotations

import pytest

from appmult.codes import codes_to_values, values_to_codes
from appmult.hdl import from_spec
from appmult.lut_gen import LutFile
from appmult.tb import Mismatch, simulator_available, verify_multiplier
from appmult.flows import circuit_lut

pytestmark = [pytest.mark.simulator,
              pytest.mark.skipif(not simulator_available("icarus"),
                                 reason="Icarus Verilog (iverilog, vvp) is not installed")]

SPEC = "exact:width=5,signed=true"
W = 5


@pytest.fixture(scope="module")
def good_lut() -> LutFile:
    return circuit_lut(from_spec(SPEC))


@pytest.mark.parametrize("a, b", [
    (2, 3),       # +6 stored as -6
    (-2, 3),      # -6 stored as +6
    (-16, -1),    # +16 (the most negative operand) stored as -16
    (-16, 15),    # -240 stored as +240: the largest negative product
])
def test_wrong_sign_entry_is_one_mismatch(good_lut, a, b, tmp_path):
    ca, cb = (int(values_to_codes([v], W, True)[0]) for v in (a, b))
    true = a * b
    assert int(good_lut.product[ca, cb]) == true != 0
    product = good_lut.product.copy()
    product[ca, cb] = -true
    bad = LutFile(product, width_a=W, width_b=W, signed=True,
                  metadata={"spec": SPEC, "note": "one entry with its sign flipped"})
    result = verify_multiplier(from_spec(SPEC), bad, build_dir=tmp_path)
    assert not result.passed
    assert result.pairs_checked == 1 << (2 * W)
    assert result.mismatch_count == 1
    wp = 2 * W
    assert result.mismatches == (Mismatch(
        a_code=ca, b_code=cb,
        a_value=int(codes_to_values([ca], W, True)[0]), b_value=int(codes_to_values([cb], W, True)[0]),
        expected=-true, actual=true, actual_bits=format(true & ((1 << wp) - 1), f"0{wp}b")),)


def test_unchanged_signed_lut_passes(good_lut, tmp_path):
    """The control: the same LUT without the flipped entry passes (the failure above is the sign)."""
    result = verify_multiplier(from_spec(SPEC), good_lut, build_dir=tmp_path)
    assert result.passed and result.mismatch_count == 0
