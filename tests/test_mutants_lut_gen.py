"""Tests written for mutants of appmult.lut_gen (gradients, lutfile, metrics) that survived
mutation testing (mutmut) and were first accepted as equivalent or untestable.

Each test checks behaviour against an independent reference (a plain re-implementation of
the documented half-window heuristic, exact rationals, hand-built ``.npy`` members whose
sizes are counted byte by byte) and its docstring says which behaviour the mutants broke.
"""

from __future__ import annotations

import json
import struct
import zipfile
from fractions import Fraction

import numpy as np
import pytest

from appmult.lut_gen import (LutFile, LutFileError, MetricsAccumulator, auto_half_window, error_metrics,
                             exact_product, load, metrics_under)
from appmult.lut_gen import gradients as G
from appmult.lut_gen.lutfile import read_sha256
from conftest import exact as msg

# -- auto_half_window: the documented heuristic, re-implemented with plain loops ------------


def _ref_lines(f: np.ndarray, h: int) -> np.ndarray:
    """LUT-2D derivative along axis 1 of ``f`` (unsigned: each row a line sorted by value):
    clipped moving average, central difference inside, one edge constant per line."""
    m, n = f.shape
    c = np.concatenate([np.zeros((m, 1)), np.cumsum(f, axis=1)], axis=1)
    lo = np.maximum(0, np.arange(n) - h)
    hi = np.minimum(n - 1, np.arange(n) + h) + 1
    s = (c[:, hi] - c[:, lo]) / (hi - lo)
    g = np.repeat(((f.max(axis=1) - f.min(axis=1)) / n)[:, None], n, axis=1)
    i = np.arange(h + 1, n - 1 - h)
    g[:, i] = (s[:, i + 1] - s[:, i - 1]) / 2
    return g


def _ref_roughness(g: np.ndarray, h: int) -> float:
    inner = g[:, h + 1:g.shape[1] - 1 - h]
    if inner.shape[1] < 2:
        return 0.0
    scale = np.abs(inner).mean()
    return 0.0 if scale == 0 else float(np.abs(np.diff(inner, axis=1)).mean() / scale)


def _ref_rough_unsigned(p: np.ndarray) -> dict[int, float]:
    """Roughness per half window of an unsigned table of at most 128 codes per operand
    (every line sampled): the larger of the d/da and d/db roughness."""
    f = p.astype(float)
    return {h: max(_ref_roughness(_ref_lines(f.T, h), h), _ref_roughness(_ref_lines(f, h), h))
            for h in G.HALF_WINDOWS if 2 * h + 1 < min(p.shape)}


def _ref_choice(rough: dict[int, float], threshold: float = 0.05) -> int:
    for h, r in rough.items():
        if r <= threshold:
            return h
    return min(rough, key=lambda h: (rough[h], h))


def test_auto_half_window_operand_without_slope_counts_as_smooth():
    """A table that does not depend on ``a`` has an all-zero interior d/da: its roughness is
    0 by definition (scale 0), so the choice follows d/db alone, whichever operand it is.
    (Mutant: the zero-scale guard moved to ``scale == 1``; the 0/0 roughness is NaN, and
    NaN as the first argument of ``max`` blocks every half window but the first.)"""
    rng = np.random.default_rng(3)
    g = 40 * np.arange(64) + rng.integers(-60, 61, 64)
    p = np.broadcast_to(g[None, :], (64, 64)).copy()            # p[a, b] = g(b)
    want = _ref_choice(_ref_rough_unsigned(p))
    assert want != 1                                            # h = 1 is too rough here
    assert auto_half_window(p, 6, 6, False) == want
    assert auto_half_window(p.T.copy(), 6, 6, False) == want     # the same table, operands swapped


def _module_roughness(p: np.ndarray, h: int) -> float:
    """The roughness auto_half_window computes for an unsigned table with every line sampled."""
    va, vb = np.arange(p.shape[0]), np.arange(p.shape[1])
    return max(G._roughness(G._lut2d_axis(p, h, False, va, 0), h),
               G._roughness(G._lut2d_axis(p, h, False, vb, 1).T, h))


def test_auto_half_window_roughness_at_the_threshold_is_enough():
    """"The smallest H whose roughness is *at most* threshold wins": a threshold equal to
    H = 1's roughness (bit for bit) picks H = 1, although H = 2 is smoother; just below it,
    H = 1 no longer qualifies. (Mutant: ``r < threshold``.)"""
    rng = np.random.default_rng(5)
    p = np.outer(np.arange(32), np.arange(32)) + rng.integers(-3, 4, (32, 32))
    r1, r2 = _module_roughness(p, 1), _module_roughness(p, 2)
    ref = _ref_rough_unsigned(p)
    assert r1 == pytest.approx(ref[1], rel=1e-12) and r2 == pytest.approx(ref[2], rel=1e-12)
    assert 0 < r2 < r1
    assert auto_half_window(p, 5, 5, False, threshold=r1) == 1
    assert auto_half_window(p, 5, 5, False, threshold=np.nextafter(r1, 0)) == _ref_choice(
        ref, np.nextafter(r1, 0)) != 1


@pytest.mark.parametrize("signed", [False, True])
def test_auto_half_window_ties_keep_the_least_smoothing(signed):
    """When no half window reaches the threshold, the smoothest wins, and among equally
    smooth ones the smallest (least smoothing): the exact multiplier's gradient is constant
    (roughness 0 for every H), so a threshold no roughness reaches still gives H = 1.
    (Mutant: ``r <= best_r`` moves to the largest tied H.)"""
    p = exact_product(6, 6, signed)
    assert auto_half_window(p, 6, 6, signed, threshold=-1.0) == 1
    zero = np.zeros((64, 64), np.int64)
    assert auto_half_window(zero, 6, 6, signed, threshold=-1.0) == 1


# -- metrics_under: histograms are normalised in float64 ------------------------------------


def test_metrics_under_normalises_float32_histograms_in_float64():
    """Histograms of any float dtype are normalised in float64: float32 counts give the
    metrics of the same counts as float64, which match the exact rational means.
    (Mutant: ``np.asarray(hist)`` keeps float32 and normalises in float32.)"""
    x = exact_product(2, 3, False)
    rng = np.random.default_rng(7)
    p = x + rng.integers(-5, 6, x.shape)
    ha = np.array([1, 2, 3, 7], np.float32)
    hb = np.array([3, 1, 4, 1, 5, 9, 2, 6], np.float32)
    m32 = metrics_under(p, x, ha, hb)
    m64 = metrics_under(p, x, ha.astype(np.float64), hb.astype(np.float64))
    assert m32 == m64
    ia, ib = ha.astype(int).tolist(), hb.astype(int).tolist()
    tot = sum(ia) * sum(ib)
    mae = sum(Fraction(ia[i] * ib[j] * abs(int(p[i, j] - x[i, j])), tot) for i in range(4) for j in range(8))
    bias = sum(Fraction(ia[i] * ib[j] * int(p[i, j] - x[i, j]), tot) for i in range(4) for j in range(8))
    assert m32["mae"] == pytest.approx(float(mae), rel=1e-14)
    assert m32["bias"] == pytest.approx(float(bias), rel=1e-13, abs=1e-15)
    # the float64 reference is as exact as the rationals: float32 normalisation is not
    w32 = np.outer(ha / ha.sum(), hb / hb.sum()).astype(np.float64)
    assert error_metrics(p, x, w32)["mae"] != pytest.approx(float(mae), rel=1e-12)


def test_streamed_error_sums_stay_exact_integers_beyond_2_53():
    """Sums of |e| and e are exact integers (the module docstring): two blocks of 2**22
    errors just below 2**32 sum to more than 2**53 each, odd, so a float64 block sum rounds
    (by one, half to even) and the two roundings add up to a different mean than the
    correctly rounded exact one. (Mutants: products or exact values converted to float64
    instead of int64 before the error is taken.)"""
    n, c = 1 << 22, (1 << 32) - 1
    acc = MetricsAccumulator()
    total = 0
    for k in (7, 3):                        # block sums = 1 and 5 (mod 8), both > 2**53
        e = np.full(n, c, np.int64)
        e[0] -= k
        total += c * n - k
        acc.update(e, np.zeros(n, np.int64))
        del e
    r = acc.result()
    assert total > 2 ** 54 and total % 8 == 6   # a tie between two floats: the exact one rounds to even
    assert r["mae"] == float(Fraction(total, 2 * n)) and r["bias"] == r["mae"]
    assert r["pairs"] == 2 * n and r["wce"] == c


# -- the LUT file: hand-built members --------------------------------------------------------


def _lut(gradients=None) -> LutFile:
    rng = np.random.default_rng(0)
    p = exact_product(3, 2, False) + rng.integers(-1, 2, (8, 4))
    return LutFile(p, width_a=3, width_b=2, signed=False, gradients=gradients)


def _npy(arr: np.ndarray, header_len: int | None = None) -> bytes:
    """An .npy (format 1.0) member, its header text padded to ``header_len`` bytes."""
    text = repr({"descr": np.lib.format.dtype_to_descr(arr.dtype), "fortran_order": False,
                 "shape": arr.shape})
    text += " " * ((header_len or len(text) + 1) - len(text) - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1") + arr.tobytes()


def _rewrite(src, dst, replace=None, rename=None):
    """Copy a zip, replacing members' bytes (``{name: bytes}``) and renaming members."""
    replace, rename = replace or {}, rename or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            data = replace.get(info.filename, zin.read(info.filename))
            zout.writestr(rename.get(info.filename, info.filename), data)
    return dst


def _json_member(obj) -> bytes:
    return _npy(np.frombuffer(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode(), np.uint8))


def _header(lut: LutFile, **changes) -> bytes:
    h = {"magic": "appmult-lut", "format_version": 1, "width_a": lut.width_a, "width_b": lut.width_b,
         "signed": lut.signed, "gradients": sorted(lut.gradients)}
    h.update(changes)
    return _json_member(h)


def test_a_member_with_another_suffix_is_not_the_product(tmp_path):
    """Only ``<name>.npy`` members count: a product stored as ``product.bin`` leaves the
    file without a product. (Mutant: every member's name loses its last four characters.)"""
    src = _lut().save(tmp_path / "ok.npz")
    _rewrite(src, tmp_path / "bin.npz", rename={"product.npy": "product.bin"})
    with pytest.raises(LutFileError, match=r"is not an appmult LUT file \(missing product\)$"):
        load(tmp_path / "bin.npz")


@pytest.mark.parametrize("bad", [
    lambda b: b.reshape(1, -1),                 # uint8, but 2-D
    lambda b: b.view(np.int8),                  # 1-D, but int8
])
def test_text_members_must_be_1d_uint8(bad, tmp_path):
    """The header must be a 1-D uint8 array, even when its bytes would decode: the message
    names what was found and what is expected. (Mutants: ``or`` for ``and`` in the check,
    and the expected description changed or dropped.)"""
    lut = _lut()
    src = lut.save(tmp_path / "ok.npz")
    text = np.frombuffer(json.dumps(lut._header(), sort_keys=True, separators=(",", ":")).encode(), np.uint8)
    arr = bad(text)
    _rewrite(src, tmp_path / "bad.npz", replace={"header.npy": _npy(arr)})
    with pytest.raises(LutFileError, match=msg(
            f"LUT file {tmp_path / 'bad.npz'}: member 'header.npy' holds {arr.dtype} of shape {arr.shape}, "
            f"expected a 1-D uint8 array")):
        load(tmp_path / "bad.npz")


@pytest.mark.parametrize("digest", ["0" * 63, "X" * 64, "A" * 64, "0" * 65])
def test_read_sha256_refuses_what_is_not_a_lowercase_hex_digest(digest, tmp_path):
    """``read_sha256`` (a cache key, nothing else verified) returns only 64 lowercase hex
    digits. (Mutants: ``and`` for ``or`` between length and alphabet; ``X`` in the alphabet.)"""
    lut = _lut()
    src = lut.save(tmp_path / "ok.npz")
    assert read_sha256(src) == lut.sha256
    _rewrite(src, tmp_path / "d.npz", replace={"sha256.npy": _npy(np.frombuffer(digest.encode(), np.uint8))})
    with pytest.raises(LutFileError, match=msg(f"LUT file {tmp_path / 'd.npz'}: member 'sha256.npy' is not "
                                               f"a SHA-256 hex digest")):
        read_sha256(tmp_path / "d.npz")


def test_gradient_member_size_limit_is_exact(tmp_path):
    """A gradient member may declare up to ``4*N`` data bytes plus 64 KiB of .npy framing
    (N = 2**(wa+wb)), and no more: at exactly the limit the file loads (the bytes after the
    array are not read, as np.load does not read them), one byte more is refused unread.
    (Mutants: ``>=`` at the limit; the limit ``5*N``; reading the member to its end.)"""
    lut = _lut({"lut1d": (np.arange(4.0), np.linspace(-1, 1, 8))})
    src = lut.save(tmp_path / "ok.npz")
    limit = 32 * 4 + (1 << 16)
    good = _npy(np.linspace(-1, 1, 8).astype(np.float32))
    assert len(good) < limit
    for size in (limit, limit + 1):
        _rewrite(src, tmp_path / f"{size}.npz",
                 replace={"grad__lut1d__b.npy": good + b"\0" * (size - len(good))})
        assert np.load(tmp_path / f"{size}.npz")["grad__lut1d__b"].tolist() == \
            np.linspace(-1, 1, 8).astype(np.float32).tolist()
    back = load(tmp_path / f"{limit}.npz")
    assert back.sha256 == lut.sha256
    assert np.array_equal(back.gradient("lut1d")[1], np.linspace(-1, 1, 8).astype(np.float32))
    with pytest.raises(LutFileError, match=msg(
            f"LUT file {tmp_path / f'{limit + 1}.npz'}: member 'grad__lut1d__b.npy' declares {limit + 1} "
            f"bytes uncompressed, more than the {limit} it may hold; refusing to inflate it")):
        load(tmp_path / f"{limit + 1}.npz")


def test_npy_headers_up_to_64_kib_are_read(tmp_path):
    """The .npy header may be as long as format 1.0 allows (the slack is 64 KiB), beyond
    numpy's default 10 000-byte guard; the sha256 member may then be exactly 64 KiB + 64
    bytes, the most it may declare. (Mutants: numpy's default ``max_header_size``; ``>=``
    at the member limit.)"""
    lut = _lut()
    src = lut.save(tmp_path / "ok.npz")
    product = _npy(lut.product.astype(np.int16), header_len=20000)
    _rewrite(src, tmp_path / "long.npz", replace={"product.npy": product})
    back = load(tmp_path / "long.npz")
    assert np.array_equal(back.product, lut.product) and back.sha256 == lut.sha256
    digest = np.frombuffer(lut.sha256.encode(), np.uint8)
    sha = _npy(digest, header_len=(1 << 16) + 64 - 10 - 64)
    assert len(sha) == (1 << 16) + 64
    _rewrite(src, tmp_path / "sha.npz", replace={"sha256.npy": sha})
    assert read_sha256(tmp_path / "sha.npz") == lut.sha256
    assert load(tmp_path / "sha.npz").sha256 == lut.sha256


@pytest.mark.parametrize("field, value, shown", [
    ("width_a", 17, "must be an integer in 1..16, not 17"),
    ("width_b", 0, "must be an integer in 1..16, not 0"),
    ("gradients", {"lut2d": 1}, "must be a list of method names, not an object"),
    ("gradients", "lut2d", 'must be a list of method names, not "lut2d"'),
])
def test_header_fields_out_of_schema_are_named_with_their_value(field, value, shown, tmp_path):
    """A header field outside its schema is refused by the schema, naming the field and
    showing the value as JSON (objects by their type). (Mutants: widths up to 17 pass the
    schema and fail later with another message; a dict shown as ``null`` or as its JSON.)"""
    lut = _lut()
    src = lut.save(tmp_path / "ok.npz")
    _rewrite(src, tmp_path / "h.npz", replace={"header.npy": _header(lut, **{field: value})})
    with pytest.raises(LutFileError, match=msg(f"LUT file {tmp_path / 'h.npz'}: header field {field!r} {shown}")):
        load(tmp_path / "h.npz")


@pytest.mark.parametrize("field, value, shown", [
    ("width_a", 17, "an integer in 1..16, not 17"),
    ("width_b", "2", 'an integer in 1..16, not "2"'),
    ("signed", None, "true or false, not null"),
    ("metrics", [1], "a JSON object, not a list"),
])
def test_metadata_fields_out_of_schema_are_named_with_their_value(field, value, shown, tmp_path):
    """Metadata read from a file follows the schema: the message names the field and shows
    a scalar value as JSON (a list or object by its type). (Mutants: every value shown by
    its type, or as ``null``; width 17 accepted by the schema.)"""
    lut = _lut()
    src = lut.save(tmp_path / "ok.npz")
    _rewrite(src, tmp_path / "m.npz", replace={"metadata.npy": _json_member({field: value})})
    with pytest.raises(LutFileError, match=msg(
            f"LUT file {tmp_path / 'm.npz'}: metadata field {field!r} must be {shown}")):
        load(tmp_path / "m.npz")

