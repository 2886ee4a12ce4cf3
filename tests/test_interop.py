"""Interop formats and third-party Verilog netlists."""

from __future__ import annotations

import re

import numpy as np
import pytest

from appmult.lut_gen import exact_product
import appmult.flows.characterization as charmod
from appmult.flows import characterize_verilog
from appmult.lut_gen.interop import (from_torchapprox, read_listing, read_tfapprox, to_torchapprox, write_listing, write_tfapprox)


@pytest.mark.parametrize("operands", ["values", "codes"])
@pytest.mark.parametrize("signed", [False, True])
def test_listing_round_trip(tmp_path, operands, signed):
    rng = np.random.default_rng(1)
    p = exact_product(3, 2, signed) + rng.integers(-3, 4, size=(8, 4))
    path = write_listing(tmp_path / "lut.txt", p, 3, 2, signed, operands=operands)
    assert np.array_equal(read_listing(path, 3, 2, signed, operands=operands), p)
    first = path.read_text().splitlines()[0].split()
    if signed and operands == "values":
        assert first[:2] == ["-4", "-2"] and int(first[2]) == p[4, 2]
    else:
        assert first[:2] == ["0", "0"] and int(first[2]) == p[0, 0]


def test_listing_wrong(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("0 0 0\n0 1 0\n1 0 0\n")
    with pytest.raises(ValueError, match=r"must hold every one of the 4 operand pairs exactly once \(3 lines"):
        read_listing(path, 1, 1, False)
    with pytest.raises(ValueError, match=r"^Listing operands must be 'values' or 'codes', not 'bits'$"):
        read_listing(path, 1, 1, False, operands="bits")
    path.write_text("0 0 0\n0 9 0\n1 0 0\n1 1 1\n")
    with pytest.raises(ValueError, match=r"Value 9 does not fit a 1-bit unsigned operand"):
        read_listing(path, 1, 1, False)


def test_tfapprox_round_trip(tmp_path):
    p = exact_product(8, 8, False) & ~3
    path = write_tfapprox(tmp_path / "mul.bin", p)
    raw = path.read_bytes()
    assert len(raw) == 131072
    assert int.from_bytes(raw[2 * (256 * 200 + 100):][:2], "little") == p[200, 100]
    assert np.array_equal(read_tfapprox(path), p)


def test_tfapprox_wrong(tmp_path):
    with pytest.raises(ValueError, match=r"^The TFApprox format holds unsigned 8x8 multipliers only, not signed ones$"):
        write_tfapprox(tmp_path / "x.bin", exact_product(8, 8, True), signed=True)
    with pytest.raises(ValueError, match=r"^The TFApprox format holds 8x8 tables only, not 4x4$"):
        write_tfapprox(tmp_path / "x.bin", exact_product(4, 4, False), 4, 4)
    (tmp_path / "short.bin").write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match=r"must be 131072 bytes \(256x256 uint16\), not 10$"):
        read_tfapprox(tmp_path / "short.bin")


def test_torchapprox():
    p = exact_product(8, 8, True)
    t = to_torchapprox(p)
    assert t.dtype == np.int16 and t.shape == (256, 256)
    # TorchApprox's accurate table: x = arange(256); x[x >= 128] -= 256; indexed by bit patterns.
    x = np.arange(256)
    x[x >= 128] -= 256
    assert np.array_equal(t, np.outer(x, x).astype(np.int16))
    asym = p + np.arange(256)[None, :]
    assert np.array_equal(from_torchapprox(to_torchapprox(asym, transpose=True), transpose=True), asym)
    with pytest.raises(ValueError, match=r"^Products 0\.\.65025 do not fit TorchApprox's int16 table$"):
        to_torchapprox(exact_product(8, 8, False), signed=False)
    with pytest.raises(ValueError, match=r"^A TorchApprox LUT is a 256x256 integer array"):
        from_torchapprox(np.zeros((16, 16), np.int16))


EVO_STYLE = """
// EvoApprox-style 4x4 unsigned multiplier: exact product with the LSB forced to 0.
module mul4u_lsb0(A, B, O);
  input [3:0] A;
  input [3:0] B;
  output [7:0] O;
  wire [7:0] full;
  assign full = A * B;
  assign O = {full[7:1], 1'b0};
endmodule
"""


def test_characterize_third_party_verilog(tmp_path, monkeypatch):
    monkeypatch.setattr(charmod, "lut_cache_dir", lambda: tmp_path / "lutcache")
    path = tmp_path / "mul4u_lsb0.v"
    path.write_text(EVO_STYLE)
    c = characterize_verilog(path, top="mul4u_lsb0", width_a=4, width_b=4, signed=False, progress=False,
                             cost=False)
    a = np.arange(16)[:, None]
    b = np.arange(16)[None, :]
    assert np.array_equal(c.product, (a * b) & ~1)
    assert c.spec is None and c.name == "mul4u_lsb0"
    assert c.metrics["er_pct"] == pytest.approx(100 * np.mean((a * b) % 2 == 1))
    lut = c.to_lutfile()
    assert lut.metadata["family"] == "netlist:verilog" and lut.metadata["sha256_netlist"] == c.sha256_netlist
    assert set(lut.gradients) == {"ste", "lut2d", "lut1d"}


def test_listing_empty_wrong(tmp_path):  # said "must have three integers per line, not 1"
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=re.escape(
            f"Listing {tmp_path / 'empty.txt'} is empty: it must hold one line 'a b product' per operand pair")):
        read_listing(tmp_path / "empty.txt", 2, 2, True)


def test_uint64_beyond_int64_wrong(tmp_path):
    # 2**64 - 1 became -1 (and passed TorchApprox's int16 check).
    table = exact_product(8, 8, False).astype(np.uint64)
    table[1, 1] = np.iinfo(np.uint64).max
    message = re.escape("Product table holds 18446744073709551615, beyond the int64 range the formats carry")
    with pytest.raises(ValueError, match=message):
        to_torchapprox(table, signed=False)
    with pytest.raises(ValueError, match=message):
        write_listing(tmp_path / "l.txt", table, 8, 8, False)
