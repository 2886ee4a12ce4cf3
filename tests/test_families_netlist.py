"""Every registered family: the synthesized gate netlist equals the family's numpy model exhaustively."""

from __future__ import annotations

import numpy as np
import pytest

from appmult.hdl import FAMILIES
from appmult.sim import synthesize

# One non-trivial parameter set per family (valid at 4x4, 8x8 and 6x3).
PARAMS = {
    "exact": {},
    "truncated": {"columns": 3, "compensate": True},
    "perforated": {"rows": [0, 2]},
    "broken_array": {"hbl": 1, "vbl": 3},
    "drum": {"k": 3},
    "mitchell": {},
    "loa": {"lower": 3},
}
WIDTHS = [(4, 4), (8, 8), (6, 3)]


def test_every_family_has_a_parameter_set():
    # File-backed families (netlist:path=...) have their own tests (tests/test_explore_netlist.py).
    parametric = [name for name, cls in FAMILIES.items() if not cls.FILE_BACKED]
    assert sorted(parametric) == sorted(PARAMS), "add a parameter set for new families to PARAMS"


@pytest.mark.parametrize("wa,wb", WIDTHS, ids=[f"{a}x{b}" for a, b in WIDTHS])
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("family", sorted(PARAMS))
def test_netlist_equals_model(family, signed, wa, wb):
    if family not in FAMILIES:
        pytest.skip(f"family {family!r} is not registered")
    m = FAMILIES[family](width_a=wa, width_b=wb, signed=signed, **PARAMS[family])
    a, b = np.meshgrid(np.arange(1 << wa), np.arange(1 << wb), indexing="ij")
    np.testing.assert_array_equal(synthesize(m).exhaustive(), m.model(a, b))
