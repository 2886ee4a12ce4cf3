"""Multiplier families: numpy models against independent references, circuits against models.

The references here are deliberately naive: plain Python integers, one operand pair at a
time, written from the published definitions (true two's complement bit weights for the
partial-product families, not the Baugh--Wooley expansion the circuits use).
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction
from typing import Callable

import numpy as np
import pytest
from amaranth.sim import Simulator

from appmult.codes import codes_to_values, values_to_codes
from appmult.hdl import (
    FAMILIES,
    BrokenArrayMultiplier,
    DrumMultiplier,
    ExactMultiplier,
    LoaArrayMultiplier,
    MitchellMultiplier,
    PerforatedMultiplier,
    TruncatedMultiplier,
    export_verilog,
    from_spec,
)


# -- independent references (scalar, on values) ---------------------------------------------
def bit_weight(i: int, width: int, signed: bool) -> int:
    """Two's complement weight of bit i: the sign bit weighs -2**(w-1)."""
    return -(1 << i) if signed and i == width - 1 else (1 << i)


def ref_kept_bits(a: int, b: int, wa: int, wb: int, signed: bool, keep, compensate: bool = False) -> int:
    """Sum of a_i * b_j * w_i * w_j over the kept bits, with true two's complement weights."""
    ca, cb = a & ((1 << wa) - 1), b & ((1 << wb) - 1)
    total = 0
    expected_dropped = Fraction(0)
    for i in range(wa):
        for j in range(wb):
            weight = bit_weight(i, wa, signed) * bit_weight(j, wb, signed)
            if keep(i, j):
                total += ((ca >> i) & 1) * ((cb >> j) & 1) * weight
            else:
                expected_dropped += Fraction(weight, 4)
    if compensate:
        total += math.floor(expected_dropped + Fraction(1, 2))
    return total


def ref_sign_magnitude(a: int, b: int, core) -> int:
    mag = core(abs(a), abs(b))
    return -mag if (a < 0) != (b < 0) else mag


def ref_drum_operand(x: int, k: int) -> int:
    t = x.bit_length() - 1
    if t < k:
        return x
    shift = t - k + 1
    return ((x >> shift) | 1) << shift


def ref_drum(a: int, b: int, wa: int, wb: int, signed: bool, k: int) -> int:
    def core(x, y):
        p = ref_drum_operand(x, k) * ref_drum_operand(y, k)
        # Documented: a signed core saturates at the largest positive product.
        return min(p, (1 << (wa + wb - 1)) - 1) if signed else p
    return ref_sign_magnitude(a, b, core)


def ref_mitchell(a: int, b: int) -> int:
    def core(x, y):
        if x == 0 or y == 0:
            return 0
        kx, ky = x.bit_length() - 1, y.bit_length() - 1
        s = Fraction(x, 1 << kx) - 1 + Fraction(y, 1 << ky) - 1
        p = (1 + s) * 2 ** (kx + ky) if s < 1 else s * 2 ** (kx + ky + 1)
        return math.floor(p)
    return ref_sign_magnitude(a, b, core)


def ref_loa_add(x: int, y: int, lower: int, wp: int) -> int:
    """Bit-level Lower-part-OR Adder on wp-bit words: OR below `lower`, ripple-carry above."""
    xs = [(x >> p) & 1 for p in range(wp)]
    ys = [(y >> p) & 1 for p in range(wp)]
    out = [0] * wp
    carry = xs[lower - 1] & ys[lower - 1] if lower >= 1 and lower <= wp else 0
    for p in range(wp):
        if p < lower:
            out[p] = xs[p] | ys[p]
        else:
            s = xs[p] + ys[p] + carry
            out[p], carry = s & 1, s >> 1
    return sum(bit << p for p, bit in enumerate(out))


def ref_loa(a: int, b: int, wa: int, wb: int, lower: int) -> int:
    wp = wa + wb

    def core(x, y):
        acc = x if y & 1 else 0
        for j in range(1, wb):
            acc = ref_loa_add(acc, (x << j) if (y >> j) & 1 else 0, lower, wp)
        return acc
    return ref_sign_magnitude(a, b, core)


def reference(m) -> Callable[[int, int], int]:
    """Scalar reference (a_value, b_value) -> product for multiplier m."""
    wa, wb, sg = m.width_a, m.width_b, m.signed
    if isinstance(m, ExactMultiplier):
        return lambda a, b: a * b
    if isinstance(m, TruncatedMultiplier):
        return lambda a, b: ref_kept_bits(a, b, wa, wb, sg, lambda i, j: i + j >= m.columns, m.compensate)
    if isinstance(m, PerforatedMultiplier):
        return lambda a, b: ref_kept_bits(a, b, wa, wb, sg, lambda i, j: j not in m.rows)
    if isinstance(m, BrokenArrayMultiplier):
        return lambda a, b: ref_kept_bits(a, b, wa, wb, sg, lambda i, j: j >= m.hbl and i + j >= m.vbl)
    if isinstance(m, DrumMultiplier):
        return lambda a, b: ref_drum(a, b, wa, wb, sg, m.k)
    if isinstance(m, MitchellMultiplier):
        return ref_mitchell
    if isinstance(m, LoaArrayMultiplier):
        return lambda a, b: ref_loa(a, b, wa, wb, m.lower)
    raise AssertionError(type(m))


def wrap(v: int, width: int, signed: bool) -> int:
    v &= (1 << width) - 1
    return v - (1 << width) if signed and v >> (width - 1) else v


# -- operand sets ---------------------------------------------------------------------------
def all_pairs(wa: int, wb: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.meshgrid(np.arange(1 << wa), np.arange(1 << wb), indexing="ij")
    return a.ravel(), b.ravel()


def sample_pairs(wa: int, wb: int, n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random code pairs plus every pair of extreme codes (0, 1, +-max, most negative)."""
    rng = np.random.default_rng(seed)

    def extremes(w):
        h = 1 << (w - 1)
        return [0, 1, 2, h - 1, h, h + 1, (1 << w) - 1]
    ea, eb = zip(*itertools.product(extremes(wa), extremes(wb)))
    a = np.concatenate([np.array(ea), rng.integers(0, 1 << wa, n)])
    b = np.concatenate([np.array(eb), rng.integers(0, 1 << wb, n)])
    return a, b


def operand_pairs(wa: int, wb: int, n_sample: int) -> tuple[np.ndarray, np.ndarray]:
    return all_pairs(wa, wb) if wa + wb <= 10 else sample_pairs(wa, wb, n_sample)


# -- (a) numpy models against the references -----------------------------------------------
def make(family: str, wa: int, wb: int, signed: bool, **params):
    return FAMILIES[family](width_a=wa, width_b=wb, signed=signed, **params)


MODEL_CASES = [
    ("exact", {}),
    ("truncated", {"columns": 0}),
    ("truncated", {"columns": 3}),
    ("truncated", {"columns": 3, "compensate": True}),
    ("truncated", {"columns": 6, "compensate": True}),
    ("truncated", {"columns": "max"}),
    ("perforated", {"rows": []}),
    ("perforated", {"rows": [0]}),
    ("perforated", {"rows": [2, 0]}),
    ("perforated", {"rows": ["sign"]}),
    ("broken_array", {"hbl": 0, "vbl": 0}),
    ("broken_array", {"hbl": 1, "vbl": 3}),
    ("broken_array", {"hbl": 2, "vbl": 6}),
    ("drum", {"k": 2}),
    ("drum", {"k": 3}),
    ("drum", {"k": "max"}),
    ("mitchell", {}),
    ("loa", {"lower": 0}),
    ("loa", {"lower": 1}),
    ("loa", {"lower": 4}),
    ("loa", {"lower": "wp-1"}),
    ("loa", {"lower": "wp"}),
]


def resolve(params: dict, wa: int, wb: int) -> dict:
    """Turn width-relative parameter placeholders into numbers."""
    out = {}
    for key, value in params.items():
        if value == "max":
            value = {"columns": wa + wb - 1, "k": max(wa, wb)}[key]
        elif value == "wp":
            value = wa + wb
        elif value == "wp-1":
            value = wa + wb - 1
        elif isinstance(value, list):
            value = [wb - 1 if v == "sign" else v for v in value]
        out[key] = value
    return out


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("wa,wb", [(4, 4), (6, 3), (8, 8)])
@pytest.mark.parametrize("family,params", MODEL_CASES, ids=[f"{f}-{p}" for f, p in MODEL_CASES])
def test_model_matches_reference(family, params, wa, wb, signed):
    m = make(family, wa, wb, signed, **resolve(params, wa, wb))
    a, b = operand_pairs(wa, wb, 1500)
    va, vb = codes_to_values(a, wa, signed), codes_to_values(b, wb, signed)
    ref = reference(m)
    expect = np.array([wrap(ref(x, y), wa + wb, signed) for x, y in zip(va.tolist(), vb.tolist())])
    got = m.model(a, b)
    bad = np.flatnonzero(got != expect)
    assert bad.size == 0, (f"{m.spec}: a={va[bad[0]]} b={vb[bad[0]]} model={got[bad[0]]} "
                           f"reference={expect[bad[0]]}")


# -- (b) Amaranth's simulator against the model --------------------------------------------
def simulate(m, a_codes: np.ndarray, b_codes: np.ndarray) -> np.ndarray:
    """Product values from Amaranth's Python simulator, one Simulator for all pairs."""
    va = codes_to_values(a_codes, m.width_a, m.signed).tolist()
    vb = codes_to_values(b_codes, m.width_b, m.signed).tolist()
    out: list[int] = []

    async def testbench(ctx):
        for x, y in zip(va, vb):
            # Signed ports take values, not codes.
            ctx.set(m.a, x)
            ctx.set(m.b, y)
            out.append(ctx.get(m.p))

    sim = Simulator(m)
    sim.add_testbench(testbench)
    sim.run()
    return np.array(out, dtype=np.int64)


SIM_CASES = [
    ("exact", {}),
    ("truncated", {"columns": 4, "compensate": True}),
    ("perforated", {"rows": [0, 2]}),
    ("broken_array", {"hbl": 1, "vbl": 4}),
    ("drum", {"k": 2}),
    ("drum", {"k": 3}),
    ("mitchell", {}),
    ("loa", {"lower": 4}),
]


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("wa,wb", [(4, 4), (6, 3), (8, 8)])
@pytest.mark.parametrize("family,params", SIM_CASES, ids=[f"{f}-{p}" for f, p in SIM_CASES])
def test_circuit_matches_model(family, params, wa, wb, signed):
    m = make(family, wa, wb, signed, **params)
    a, b = operand_pairs(wa, wb, 300)
    got = simulate(m, a, b)
    expect = m.model(a, b)
    bad = np.flatnonzero(got != expect)
    assert bad.size == 0, f"{m.spec}: codes a={a[bad[0]]} b={b[bad[0]]} circuit={got[bad[0]]} model={expect[bad[0]]}"


@pytest.mark.parametrize("spec", [
    "truncated:width=16,signed=true,columns=12,compensate=true",
    "drum:width_a=16,width_b=12,signed=true,k=2",
    "drum:width=16,k=6",
    "mitchell:width_a=16,width_b=9,signed=true",
    "mitchell:width=16",
    "loa:width=16,signed=true,lower=10",
])
def test_circuit_matches_model_wide(spec):
    # Extreme codes of the widest operands: shifts, encoders and saturation at full size.
    m = from_spec(spec)
    a, b = sample_pairs(m.width_a, m.width_b, 40)
    assert (simulate(m, a, b) == m.model(a, b)).all()


# -- (c) sanity facts -----------------------------------------------------------------------
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("wa,wb", [(4, 4), (6, 3), (3, 5)])
def test_degenerate_parameters_are_exact(wa, wb, signed):
    a, b = all_pairs(wa, wb)
    exact = ExactMultiplier(width_a=wa, width_b=wb, signed=signed).model(a, b)
    kw = {"width_a": wa, "width_b": wb, "signed": signed}
    for m in [TruncatedMultiplier(columns=0, **kw),
              PerforatedMultiplier(rows=[], **kw),
              BrokenArrayMultiplier(hbl=0, vbl=0, **kw),
              DrumMultiplier(k=max(wa, wb), **kw),
              LoaArrayMultiplier(lower=0, **kw)]:
        assert (m.model(a, b) == exact).all(), m.spec


@pytest.mark.parametrize("wa,wb", [(4, 4), (6, 3), (8, 8)])
def test_mitchell_underestimates_and_is_exact_on_powers_of_two(wa, wb):
    a, b = all_pairs(wa, wb)
    err = MitchellMultiplier(width_a=wa, width_b=wb).model(a, b) - a * b
    assert (err <= 0).all()
    assert err.min() < 0
    pow2 = ((a & (a - 1)) == 0) | ((b & (b - 1)) == 0)
    assert (err[pow2] == 0).all()
    # Signed: sign-magnitude, so the magnitude never exceeds the exact one.
    ms = MitchellMultiplier(width_a=wa, width_b=wb, signed=True)
    va, vb = codes_to_values(a, wa, True), codes_to_values(b, wb, True)
    assert (np.abs(ms.model(a, b)) <= np.abs(va * vb)).all()


@pytest.mark.parametrize("family,params", SIM_CASES, ids=[f"{f}-{p}" for f, p in SIM_CASES])
def test_most_negative_code(family, params):
    # The -2**(w-1) row and column, in the circuit, the model and the reference.
    wa = wb = 6
    m = make(family, wa, wb, True, **params)
    ref = reference(m)
    lo = -(1 << (wa - 1))
    vals = np.arange(lo, -lo)
    va = np.concatenate([np.full(vals.size, lo), vals])
    vb = np.concatenate([vals, np.full(vals.size, lo)])
    a, b = values_to_codes(va, wa, True), values_to_codes(vb, wb, True)
    expect = np.array([wrap(ref(x, y), wa + wb, True) for x, y in zip(va.tolist(), vb.tolist())])
    assert (m.model(a, b) == expect).all()
    assert (simulate(m, a, b) == expect).all()
    if family in ("exact", "mitchell"):
        assert m.model(a[:1], b[:1])[0] == lo * lo  # -32 * -32, exact for both


def test_drum_saturates_only_where_documented():
    # k=2: |-8| -> 12, 12 * 12 = 144 > 127: the signed core saturates.
    m = DrumMultiplier(width=4, signed=True, k=2)
    assert m.model([8], [8])[0] == 127
    assert m.model([8], [7])[0] == -(12 * 6)
    assert DrumMultiplier(width=4, k=2).model([8], [8])[0] == 144
    assert DrumMultiplier(width=4, signed=True, k=3).model([8], [8])[0] == 100  # 10 * 10, fits


@pytest.mark.parametrize("wa,wb", [(4, 4), (6, 3), (3, 6)])
def test_loa_accumulation_never_overflows(wa, wb):
    # The docstring's bound: the unwrapped accumulation stays below 2**(wa+wb).
    for lower in range(wa + wb + 1):
        for x in range(1 << wa):
            for y in range(1 << wb):
                acc = x if y & 1 else 0
                for j in range(1, wb):
                    row = (x << j) if (y >> j) & 1 else 0
                    if lower == 0:
                        acc += row
                    else:
                        cin = (acc >> (lower - 1)) & (row >> (lower - 1)) & 1
                        acc = (((acc >> lower) + (row >> lower) + cin) << lower) | ((acc | row) & ((1 << lower) - 1))
                assert acc < 1 << (wa + wb)


def test_loa_can_overestimate():
    m = LoaArrayMultiplier(width=4, lower=3)
    a, b = all_pairs(4, 4)
    err = m.model(a, b) - a * b
    assert err.max() > 0 and err.min() < 0


def test_truncated_compensation():
    # Unsigned 4x4, 2 columns: E = 1/4 (column 0) + 2 * 2/4 (column 1) = 1.25 -> 1.
    assert TruncatedMultiplier(width=4, columns=2, compensate=True).compensation() == 1
    assert TruncatedMultiplier(width=4, columns=2).compensation() == 0
    # Compensation brings the mean error (bias) closer to zero.
    for signed in (False, True):
        a, b = all_pairs(8, 8)
        exact = ExactMultiplier(width=8, signed=signed).model(a, b)
        plain = TruncatedMultiplier(width=8, signed=signed, columns=6).model(a, b) - exact
        comp = TruncatedMultiplier(width=8, signed=signed, columns=6, compensate=True).model(a, b) - exact
        assert abs(comp.mean()) < abs(plain.mean()) / 10


def test_perforated_sign_row():
    # Omitting the sign row of a signed b: b acts as its low bits, unsigned.
    m = PerforatedMultiplier(width=4, signed=True, rows=[3])
    a, b = all_pairs(4, 4)
    va = codes_to_values(a, 4, True)
    assert (m.model(a, b) == va * (b & 7)).all()


@pytest.mark.parametrize("family,params", SIM_CASES, ids=[f"{f}-{p}" for f, p in SIM_CASES])
def test_export_verilog_families(family, params):
    text = export_verilog(make(family, 8, 8, True, **params), name="mul")
    assert "module mul(" in text and "output [15:0] p;" in text


# -- (d) spec round trip --------------------------------------------------------------------
@pytest.mark.parametrize("spec", [
    "exact:width=8",
    "truncated:width=8,columns=5",
    "truncated:width_a=8,width_b=4,signed=true,columns=3,compensate=true",
    "perforated:width=8,rows=[0,2]",
    "perforated:width=8,signed=true,rows=[]",
    "broken_array:width=8,hbl=2,vbl=6",
    "drum:width=8,k=3",
    "drum:width=8",
    "mitchell:width_a=8,width_b=6,signed=true",
    "loa:width=8,lower=5",
])
def test_spec_round_trip(spec):
    m = from_spec(spec)
    again = from_spec(m.spec)
    assert type(again) is type(m)
    assert again.describe() == m.describe()
    assert again.spec == m.spec
    a, b = sample_pairs(m.width_a, m.width_b, 50)
    assert (again.model(a, b) == m.model(a, b)).all()


def test_params():
    assert from_spec("perforated:width=8,rows=[2,0]").rows == (0, 2)
    assert from_spec("perforated:width=8,rows=[0,2]").spec == \
        "perforated:width_a=8,width_b=8,signed=false,rows=[0,2]"
    assert PerforatedMultiplier(width=4, rows=(1,)).params == {"rows": (1,)}
    assert TruncatedMultiplier(width=8, columns=4).params == {"columns": 4, "compensate": False}
    assert BrokenArrayMultiplier(width=8, hbl=1, vbl=2).params == {"hbl": 1, "vbl": 2}
    assert DrumMultiplier(width=8).k == 4
    assert MitchellMultiplier(width_a=8, width_b=5).params == {}
    assert MitchellMultiplier(width_a=8, width_b=5).frac_bits == 7
    assert LoaArrayMultiplier(width=8, lower=3).lower == 3
    assert list(FAMILIES)[:7] == ["exact", "truncated", "perforated", "broken_array", "drum", "mitchell", "loa"]
    for cls in FAMILIES.values():
        assert cls.DESCRIPTION


# -- (e) parameter errors -------------------------------------------------------------------
@pytest.mark.parametrize("build,exc,message", [
    (lambda: TruncatedMultiplier(width=8, columns=-1), TypeError,
     r"^Truncated column count must be an integer in 0..15, not -1$"),
    (lambda: TruncatedMultiplier(width=8, columns=16), TypeError,
     r"^Truncated column count must be an integer in 0..15, not 16$"),
    (lambda: TruncatedMultiplier(width_a=4, width_b=3, columns=True), TypeError,
     r"^Truncated column count must be an integer in 0..6, not True$"),
    (lambda: TruncatedMultiplier(width=8), TypeError,
     r"^Truncated column count must be an integer in 0..15, not None$"),
    (lambda: TruncatedMultiplier(width=8, columns=2, compensate=1), TypeError,
     r"^Truncated compensate must be a bool, not 1$"),
    (lambda: PerforatedMultiplier(width=8, rows=3), TypeError,
     r"^Perforated rows must be a list of integers, not 3$"),
    (lambda: PerforatedMultiplier(width=8), TypeError,
     r"^Perforated rows must be a list of integers, not None$"),
    (lambda: PerforatedMultiplier(width_a=8, width_b=4, rows=[0, 4]), TypeError,
     r"^Perforated row must be an integer in 0..3, not 4$"),
    (lambda: PerforatedMultiplier(width=8, rows=[False]), TypeError,
     r"^Perforated row must be an integer in 0..7, not False$"),
    (lambda: PerforatedMultiplier(width=8, rows=[1, 0, 1]), ValueError,
     r"^Perforated rows must be distinct, not \[1, 0, 1\]$"),
    (lambda: BrokenArrayMultiplier(width_a=8, width_b=4, hbl=4), TypeError,
     r"^Broken-array hbl \(rows removed\) must be an integer in 0..3, not 4$"),
    (lambda: BrokenArrayMultiplier(width=8, vbl=16), TypeError,
     r"^Broken-array vbl \(columns removed\) must be an integer in 0..15, not 16$"),
    (lambda: BrokenArrayMultiplier(width=8, vbl=2.0), TypeError,
     r"^Broken-array vbl \(columns removed\) must be an integer in 0..15, not 2.0$"),
    (lambda: DrumMultiplier(width=8, k=1), TypeError,
     r"^DRUM segment width k must be an integer in 2..8, not 1$"),
    (lambda: DrumMultiplier(width_a=6, width_b=3, k=7), TypeError,
     r"^DRUM segment width k must be an integer in 2..6, not 7$"),
    (lambda: DrumMultiplier(width=3), TypeError,
     r"^DRUM segment width k must be an integer in 2..3, not 4$"),
    (lambda: LoaArrayMultiplier(width=8, lower=17), TypeError,
     r"^LOA lower-part width must be an integer in 0..16, not 17$"),
    (lambda: LoaArrayMultiplier(width=8, lower="2"), TypeError,
     r"^LOA lower-part width must be an integer in 0..16, not '2'$"),
], ids=lambda x: "" if callable(x) or isinstance(x, type) else None)
def test_params_wrong(build, exc, message):
    with pytest.raises(exc, match=message):
        build()


@pytest.mark.parametrize("spec,exc,message", [
    ("truncated:width=8,columns=16", TypeError, r"Truncated column count must be an integer in 0..15, not 16"),
    ("perforated:width=8,rows=[0,0]", ValueError, r"Perforated rows must be distinct, not \[0, 0\]"),
    ("perforated:width=8,rows=0", ValueError,
     r"Spec value for perforated parameter rows must be a list of integers like \[0,2\], not '0'"),
    ("drum:width=8,k=9", TypeError, r"DRUM segment width k must be an integer in 2..8, not 9"),
    ("loa:width=4", TypeError, r"LOA lower-part width must be an integer in 0..8, not None"),
])
def test_spec_params_wrong(spec, exc, message):
    with pytest.raises(exc, match=message):
        from_spec(spec)
