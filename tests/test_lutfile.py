"""LUT file format: round trip, hash verification, tamper and pickle refusal."""

import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from appmult.lut_gen import LutFile, LutFileError, load


def _lut(signed=False, wa=4, wb=3):
    a = np.arange(1 << wa)
    b = np.arange(1 << wb)
    if signed:
        a = np.where(a >= 1 << (wa - 1), a - (1 << wa), a)
        b = np.where(b >= 1 << (wb - 1), b - (1 << wb), b)
    prod = np.outer(a, b) - (np.outer(a, b) & 1)  # a small non-trivial approximation
    ga = np.broadcast_to(b[None, :], prod.shape).astype(np.float32)
    gb = np.broadcast_to(a[:, None], prod.shape).astype(np.float32)
    return LutFile(prod, width_a=wa, width_b=wb, signed=signed,
                   gradients={"ste": (ga, gb), "lut1d": (b.astype(np.float32), a.astype(np.float32))},
                   metadata={"family": "test", "spec": "test:width_a=4,width_b=3"})


@pytest.mark.parametrize("signed", [False, True])
def test_round_trip(tmp_path, signed):
    lut = _lut(signed)
    path = lut.save(tmp_path / "x.npz")
    again = load(path)
    assert (again.product == lut.product).all() and again.product.dtype == np.int64
    assert again.sha256 == lut.sha256
    assert (again.width_a, again.width_b, again.signed) == (4, 3, signed)
    assert again.metadata == lut.metadata
    for m in ("ste", "lut1d"):
        for x, y in zip(again.gradient(m), lut.gradient(m)):
            assert (x == y).all()
    assert not list(tmp_path.glob(".*tmp*")), "atomic write left a temporary file"


def test_hash_changes_with_content():
    a, b = _lut(), _lut()
    assert a.sha256 == b.sha256
    p = a.product.copy()
    p[3, 2] += 1
    c = LutFile(p, width_a=4, width_b=3, signed=False, metadata=a.metadata)
    assert c.sha256 != LutFile(a.product, width_a=4, width_b=3, signed=False, metadata=a.metadata).sha256


def _rewrite(path, out, mutate):
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k].copy() for k in z.files}
    mutate(arrays)
    np.savez(out, **arrays)


def test_tampered_product_refused(tmp_path):
    path = _lut().save(tmp_path / "x.npz")

    def edit(arrays):
        arrays["product"][5, 1] += 1
    _rewrite(path, tmp_path / "bad.npz", edit)
    with pytest.raises(LutFileError, match=r"does not match its content hash .* corrupt or was modified"):
        load(tmp_path / "bad.npz")


def test_tampered_metadata_refused(tmp_path):
    path = _lut().save(tmp_path / "x.npz")

    def edit(arrays):
        meta = json.loads(arrays["metadata"].tobytes())
        meta["family"] = "exact"
        arrays["metadata"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    _rewrite(path, tmp_path / "bad.npz", edit)
    with pytest.raises(LutFileError, match="does not match its content hash"):
        load(tmp_path / "bad.npz")


def test_pickled_object_refused_without_executing(tmp_path):
    marker = tmp_path / "executed"
    # An object array whose unpickling would create the marker file.
    script = f"""
import numpy as np, os
class Boom:
    def __reduce__(self):
        return (open, ({str(marker)!r}, "w"))
arr = np.empty(1, dtype=object); arr[0] = Boom()
with np.load({str(tmp_path / 'good.npz')!r}) as z:
    arrays = {{k: z[k] for k in z.files}}
arrays["product"] = arr
np.savez({str(tmp_path / 'evil.npz')!r}, allow_pickle=True, **arrays)
"""
    _lut().save(tmp_path / "good.npz")
    subprocess.run([sys.executable, "-c", script], check=True)
    with pytest.raises(LutFileError, match="pickled object"):
        load(tmp_path / "evil.npz")
    assert not marker.exists()


def test_not_a_lut_file(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(LutFileError, match="not a readable .npz archive"):
        load(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(LutFileError, match=r"is not an appmult LUT file \(missing header, metadata, product, sha256\)"):
        load(tmp_path / "other.npz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "nope.npz")
    # A truncated file (e.g. a copy interrupted midway).
    data = _lut().save(tmp_path / "x.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(LutFileError):
        load(tmp_path / "cut.npz")


def test_check_compatible():
    lut = _lut(signed=True)
    lut.check_compatible(width_a=4, width_b=3, signed=True)
    with pytest.raises(LutFileError, match=r"is 4x3 signed but the layer needs 8x8 signed"):
        lut.check_compatible(width_a=8, width_b=8, signed=True)
    with pytest.raises(LutFileError, match=r"is 4x3 signed but the layer needs 4x3 unsigned"):
        lut.check_compatible(width_a=4, width_b=3, signed=False)


def test_constructor_wrong():
    with pytest.raises(LutFileError, match=r"Product table shape \(16, 16\) does not match widths 4x3 \(expected \(16, 8\)\)"):
        LutFile(np.zeros((16, 16), dtype=np.int64), width_a=4, width_b=3, signed=False)
    with pytest.raises(LutFileError, match="Product table must hold integers, not float64"):
        LutFile(np.zeros((16, 8)), width_a=4, width_b=3, signed=False)
    with pytest.raises(LutFileError, match=r"Gradient tables for 'x' have shapes \(3,\) and \(3,\)"):
        LutFile(np.zeros((16, 8), dtype=np.int64), width_a=4, width_b=3, signed=False,
                gradients={"x": (np.zeros(3), np.zeros(3))})
    with pytest.raises(LutFileError, match="contain NaN or Inf"):
        LutFile(np.zeros((16, 8), dtype=np.int64), width_a=4, width_b=3, signed=False,
                gradients={"x": (np.full(8, np.nan), np.zeros(16))})
    with pytest.raises(KeyError, match=r"holds no 'lut2d' gradient tables \(it has: ste, lut1d\)"):
        _lut().gradient("lut2d")


def test_lut_file_import_is_light():
    code = ("import sys, appmult.lut_gen; "
            "assert 'amaranth' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_caller_arrays_stay_writable():
    prod = np.arange(16 * 8, dtype=np.int64).reshape(16, 8)
    ga = np.zeros(8, dtype=np.float32)
    lut = LutFile(prod, width_a=4, width_b=3, signed=False, gradients={"g": (ga, np.zeros(16, np.float32))})
    prod[0, 0] = 5  # the caller's array is still theirs
    ga[0] = 1.0
    assert lut.product[0, 0] == 0 and lut.gradient("g")[0][0] == 0.0
    with pytest.raises(ValueError, match="read-only"):
        lut.product[0, 0] = 1
