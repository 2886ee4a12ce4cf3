"""Brute-force checks of the kernels' performance code paths (blocking, tiling, layouts).

Each test forces the path with small block sizes (monkeypatched tuning constants) so that
channel blocks, k-blocks and tasks do not divide the problem evenly. No timing asserts.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from appmult.nn import kernels as K


def brute_forward(a: np.ndarray, b: np.ndarray, table: np.ndarray, groups: int) -> np.ndarray:
    nbatch, ktot, length = a.shape
    nout, kg = b.shape
    ng = nout // groups
    t = table.astype(np.int64)
    out = np.zeros((nbatch, nout, length), np.int64)
    for j in range(nout):
        g = j // ng
        out[:, j, :] = t[a[:, g * kg:(g + 1) * kg, :], b[j][None, :, None]].sum(1)
    return out


@pytest.mark.parametrize("signed_table", [False, True])
@pytest.mark.parametrize("slab, expand", [(None, None), (3 * 1024, 40 * 1024), (1, 1)])
@pytest.mark.parametrize("nbatch, length, groups, kg, ng", [
    (3, 600, 1, 5, 2), (5, 97, 3, 7, 5), (2, 301, 2, 13, 19), (9, 64, 1, 11, 33),
])
def test_rows_kernel_blocks(signed_table, slab, expand, nbatch, length, groups, kg, ng, monkeypatch):
    if not K.numba_available():
        pytest.skip("numba not installed")
    rng = np.random.default_rng(nbatch * 100 + kg)
    na = 64
    lo, hi = (-4000, 4000) if signed_table else (0, 4096)
    table = torch.from_numpy(rng.integers(lo, hi, (na, na))).to(torch.int32)
    if slab is not None:
        monkeypatch.setattr(K, "_SLAB_BYTES", slab)
        monkeypatch.setattr(K, "_EXPAND_BYTES", expand)
    monkeypatch.setattr(K, "ROWS_MIN_POSITIONS", 0)  # always the row kernel
    a = rng.integers(0, na, (nbatch, groups * kg, length))
    b = rng.integers(0, na, (groups * ng, kg))
    ref = brute_forward(a, b, table.numpy(), groups)
    for dt in (torch.uint8, torch.long):
        got = K.gather_forward(torch.from_numpy(a).to(dt), torch.from_numpy(b).to(dt), table, groups, torch.int32)
        assert got.dtype == torch.int32
        assert np.array_equal(got.numpy(), ref)
    got64 = K.gather_forward(torch.from_numpy(a), torch.from_numpy(b), table, groups, torch.int64)
    assert got64.dtype == torch.int64 and np.array_equal(got64.numpy(), ref)
