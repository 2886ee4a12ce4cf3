"""A conv's weight gradient through oneDNN with a channels-last operand map: no heap corruption.

torch 2.13's oneDNN weight gradient (``torch.nn.grad.conv2d_weight``) of a channels-last
input writes out of bounds for some geometries -- found by fuzzing: a LUT-2D low-rank
gradient table (its activation map comes out of ``tables._map_channels`` channels-last),
a 1x1 kernel, stride (2, 1), padding (2, 0), batch 67 aborted the process ("free(): invalid
next size") in the first backward. ``autograd._nchw`` hands it NCHW operands. The first test
runs that case in a child process under glibc's checking allocator (which aborts at the
first corrupted free instead of maybe later), the second checks the gradients themselves
against a brute-force sum.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from appmult.nn import LutTables, lut_conv2d
from test_nn_backward import grad_fns, lut_with_grads
from test_nn_luts import codes, truncated

_MALLOC_DEBUG = Path("/usr/lib/x86_64-linux-gnu/libc_malloc_debug.so.0")

_CHILD = """
import numpy as np, torch
from torch import nn
from appmult.lut_gen import LutFile
from appmult.nn import ApproxConfig, ApproxConv2d
from test_nn_luts import truncated
torch.set_num_threads(1)
torch.manual_seed(0)
lut = LutFile(truncated(6, 3), width_a=6, width_b=6, signed=False)
f = nn.Conv2d(2, 3, 1, stride=(2, 1), padding=(2, 0))
layer = ApproxConv2d.from_float(f, ApproxConfig(lut, kernel="lowrank", grad="lut2d", weight_scheme="per_tensor",
                                                compute_missing_gradients=True))
x = torch.randn(67, 2, 2, 6, requires_grad=True)
for _ in range(3):
    layer(x).sum().backward()
print("ok")
"""


def test_lut2d_lowrank_conv_backward_does_not_corrupt_the_heap():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    if _MALLOC_DEBUG.exists():
        env["LD_PRELOAD"] = str(_MALLOC_DEBUG)
        env["GLIBC_TUNABLES"] = "glibc.malloc.check=3"
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), (out.returncode, out.stderr[-2000:])


@pytest.mark.parametrize("batch", [1, 67])
def test_strided_1x1_lut2d_gradients_match_brute_force(batch):
    """The geometry of the crash (a padded row the stride skips): gradients of ``sum LUT[qx,
    qw]`` through the low-rank LUT-2D backward equal the brute-force sums of the tables."""
    lut = lut_with_grads(truncated(6, 3), 6, False, True, seed=0)
    tabs = LutTables(lut, grad="lut2d")
    rng = np.random.default_rng(batch)
    qx = torch.tensor(rng.integers(0, 64, (batch, 2, 6, 6)), dtype=torch.float32, requires_grad=True)
    qw = torch.tensor(rng.integers(0, 64, (3, 2, 1, 1)), dtype=torch.float32, requires_grad=True)
    acc = lut_conv2d(qx, qw, tabs, stride=(2, 1))
    g = torch.from_numpy(rng.normal(size=acc.shape).astype(np.float32))
    gx, gw = torch.autograd.grad(acc, (qx, qw), g)
    da, db = grad_fns(lut, "lut2d")
    cx = codes(qx.detach().long().numpy(), 6)[:, :, ::2, :]   # the rows the stride reads
    cw = codes(qw.detach().long().numpy(), 6)[:, :, 0, 0]       # (Co, C)
    gn = g.numpy().astype(np.float64)                           # (N, Co, 3, 6)
    rw = np.einsum("bjhw,bjchw->jc", gn, db(cx[:, None], cw[None, :, :, None, None]))
    rx = np.zeros(qx.shape)
    rx[:, :, ::2, :] = np.einsum("bjhw,bjchw->bchw", gn, da(cx[:, None], cw[None, :, :, None, None]))
    np.testing.assert_allclose(gw.numpy()[:, :, 0, 0], rw, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(gx.numpy(), rx, rtol=1e-4, atol=1e-3)
