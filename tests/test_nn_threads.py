"""numba's thread pool leaves torch's thread count alone.

Starting numba's OpenMP pool reset the OpenMP thread count torch runs with: after
``torch.set_num_threads(1)`` and the first approximate layer, torch reported and used every
core (``retrain --threads 1`` ran on all of them). Each check runs in a fresh interpreter,
because the pool starts once per process.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("numba")

_SCRIPT = """
import torch
torch.set_num_threads(1)
assert torch.get_num_threads() == 1
{body}
print(torch.get_num_threads())
"""


def _threads_after(body: str) -> int:
    env = {**os.environ, "NUMBA_NUM_THREADS": "3", "OMP_NUM_THREADS": "3"}  # not 1 on any machine
    out = subprocess.run([sys.executable, "-c", _SCRIPT.format(body=body)], env=env, check=True,
                         capture_output=True, text=True, timeout=300)
    return int(out.stdout.split()[-1])


def test_a_numba_kernel_keeps_torch_threads():
    # The reference: what a bare numba pool start does to torch in this environment.
    bare = _threads_after("from numba.np.ufunc.parallel import _launch_threads; _launch_threads()")
    assert bare == 3  # (if numba stops doing this, the fix below is no longer needed)
    assert _threads_after("""
import appmult.nn
import torch.nn.functional as F
from appmult.nn import ApproxLinear, ApproxConfig
from appmult.lut_gen import LutFile
import numpy as np
v = np.arange(256)
lut = LutFile(np.outer(v, v) ^ 1, width_a=8, width_b=8, signed=False)
layer = ApproxLinear(16, 8, config=ApproxConfig(lut, kernel="gather"))
layer(torch.rand(4, 16)).sum().backward()
""") == 1


def test_a_pool_started_before_appmult_is_left_as_it_is():
    # A user who started numba first gets torch's count as numba left it; appmult changes nothing.
    assert _threads_after("""
from numba.np.ufunc.parallel import _launch_threads; _launch_threads()
import appmult.nn
""") == 3


def test_cpu_threads_sets_and_restores_both():
    # retrain/assign --threads used to set torch's count only: numba's kernels ran on every core.
    import numba
    import torch

    from appmult.nn import cpu_threads
    before = torch.get_num_threads(), numba.get_num_threads()
    with cpu_threads(1):
        assert (torch.get_num_threads(), numba.get_num_threads()) == (1, 1)
    assert (torch.get_num_threads(), numba.get_num_threads()) == before
    with cpu_threads(numba.config.NUMBA_NUM_THREADS + 5):  # numba's capped at its pool
        assert (torch.get_num_threads(), numba.get_num_threads()) == (numba.config.NUMBA_NUM_THREADS + 5,
                                                                      numba.config.NUMBA_NUM_THREADS)
    with cpu_threads(None):
        assert (torch.get_num_threads(), numba.get_num_threads()) == before
    with pytest.raises(KeyError), cpu_threads(1):
        raise KeyError  # restored on the way out of an error too
    assert (torch.get_num_threads(), numba.get_num_threads()) == before
