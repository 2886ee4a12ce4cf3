"""Mutation review, session 10 (b): gaps in the heap settings, the per-channel weight
quantization pass and the int8 GEMM accumulator's torch path.

* ``heap``: glibc's ``mallopt`` is found on glibc (checked independently, by
  ``os.confstr``), both parameters are set and reported in effect -- confirmed by a fresh
  process's page-fault count -- and an opt-out or the user's own malloc settings call no
  ``mallopt`` at all. (The page-fault tests of ``test_heap.py`` run the code only in
  subprocesses, so mutmut never selects them, and their skip condition is the function
  under test.)
* ``quant._fused_channel_quant``: a channel that holds only NaN/Inf (its finiteness word is
  exactly ``2**31``) is refused; the codes, scale, zero point and mask have the torch path's
  dtypes, also under a float64 default dtype; without a mask the pass writes nothing past
  its placeholder (a fresh process quantizing long weights exits normally).
* ``fused._int8_linear_acc``: with ``APPMULT_NO_NUMBA=1`` its torch passes (activation
  factors looked up in the int8 table, two digit planes, the per-call ``Zw`` cross term)
  equal the numpy brute force and no numba epilogue runs; with numba the epilogue runs for
  float32 codes, and float16/float64 codes (numba has no float16) take the torch passes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import appmult
from appmult import heap
from appmult.errors import InvalidValueError
from appmult.nn import fused as FU
from appmult.nn import quant as Q
from appmult.nn import quant_loops
from test_heap import CHURN
from test_nn_channel_quant import bits, torch_reference
from test_nn_int8_gemm import brute_acc, quantized_case

#: The folder of the ``appmult`` this process imported (a planted copy, mutmut's
#: ``mutants/`` or the checkout): a fresh ``python -c`` there imports the same package
#: (``-c`` puts its working directory first on ``sys.path``, ahead of ``PYTHONPATH``).
PACKAGE_ROOT = Path(appmult.__file__).resolve().parents[1]

needs_numba = pytest.mark.numba   # skipped without numba or under APPMULT_NO_NUMBA (conftest)


def fresh(code: str) -> subprocess.CompletedProcess:
    """``code`` run by a fresh interpreter on the package this process imported (malloc
    settings of this environment left out, as in ``test_heap``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "APPMULT_NO_MALLOPT"}
    return subprocess.run([sys.executable, "-c", code], cwd=PACKAGE_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def faults(setup: str) -> int:
    """Minor page faults of ``test_heap``'s churn in a fresh process after ``setup``."""
    run = fresh(CHURN.format(setup=setup))
    assert run.returncode == 0, run.stderr[-500:]
    return int(run.stdout.split()[-1])


# --- heap -------------------------------------------------------------------------------


def _is_glibc() -> bool:
    try:
        return bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (AttributeError, ValueError, OSError):
        return False


def _user_malloc_settings() -> bool:
    env = os.environ
    return any(k.startswith("MALLOC_") for k in env) or env.get("APPMULT_NO_MALLOPT", "") not in ("", "0") \
        or "glibc.malloc" in env.get("GLIBC_TUNABLES", "")


on_plain_glibc = pytest.mark.skipif(not _is_glibc() or _user_malloc_settings(),
                                    reason="glibc's malloc with its default settings only")


def _recorder(calls: list, real=None):
    """A ``mallopt`` that records its arguments and calls ``real`` (or succeeds)."""
    return lambda *args: calls.append(args) or (real(*args) if real is not None else 1)


@on_plain_glibc
def test_glibc_mallopt_is_found_and_answers():
    mallopt = heap._glibc_mallopt()
    assert mallopt is not None
    assert mallopt(heap.M_MMAP_MAX, 0) == 1  # glibc's success value (the setting is already in force)


@on_plain_glibc
def test_keep_freed_memory_sets_both_parameters_in_effect(monkeypatch):
    calls = []
    real = heap._glibc_mallopt()
    monkeypatch.setattr(heap, "_done", None)
    monkeypatch.setattr(heap, "_glibc_mallopt", lambda: _recorder(calls, real))
    assert heap.keep_freed_memory() is True
    assert calls == [(heap.M_MMAP_MAX, 0), (heap.M_TRIM_THRESHOLD, heap.TRIM_THRESHOLD)]
    # what "in effect" means: a fresh process's churn stops faulting its pages in
    kept = faults("from appmult.heap import keep_freed_memory; assert keep_freed_memory()")
    assert kept * 100 < faults("")


@pytest.mark.parametrize("env", [{"APPMULT_NO_MALLOPT": "1"}, {"MALLOC_ARENA_MAX": "2"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}])
def test_opt_out_calls_no_mallopt(env, monkeypatch):
    calls = []
    monkeypatch.setattr(heap, "_done", None)
    monkeypatch.setattr(heap, "_glibc_mallopt", lambda: _recorder(calls))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert heap.keep_freed_memory() is False
    assert calls == []


# --- per-channel weight quantization ----------------------------------------------------


@needs_numba
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bad", [[float("nan")], [float("inf")], [-float("inf")], [float("nan"), float("inf")]])
def test_a_channel_of_only_non_finite_weights_is_refused(bad, signed):
    """Every weight of one output channel NaN or Inf (a diverged neuron), the others finite:
    refused like a single NaN, by the pass and by the quantizer with a layer name."""
    w = torch.randn(5, 12, generator=torch.Generator().manual_seed(len(bad)))
    w[3] = torch.tensor(bad * 12)[:12]
    assert not bool(torch.isfinite(w).all())
    wq = Q.WeightQuantizer(8, signed)
    assert Q._fused_channel_quant(w, wq, mask=False)[-1] is False
    for grad in (False, True):
        with pytest.raises(InvalidValueError, match="ApproxLinear weight contains NaN or Inf"):
            wq(w.clone().requires_grad_(grad), what="ApproxLinear")


@needs_numba
@pytest.mark.parametrize("default", [torch.float32, torch.float64])
@pytest.mark.parametrize("signed", [False, True])
def test_channel_pass_keeps_the_torch_paths_dtypes(default, signed):
    """The pass's codes, scale, zero point (float32) and mask (bool) have the dtypes of the
    torch path's, whatever the default dtype; so do the quantizer's outputs (same bits)."""
    wq = Q.WeightQuantizer(8, signed)
    w = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(1))
    prev = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        got = Q._fused_channel_quant(w, wq, mask=True)
        ref = torch_reference(w, wq)
        for a, b in zip(got[:4], ref):
            assert a.dtype == b.dtype and torch.equal(a, b)
        outs = []
        for numba_on in (True, False):
            with pytest.MonkeyPatch.context() as mp:
                if not numba_on:
                    mp.setenv("APPMULT_NO_NUMBA", "1")
                outs.append(wq(w.clone().requires_grad_(True)))
    finally:
        torch.set_default_dtype(prev)
    for a, b in zip(*outs):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(bits(a), bits(b))


_MASKLESS = textwrap.dedent("""
    import torch
    from appmult.nn import quant as Q
    wq = Q.WeightQuantizer(8, False)
    for _ in range(20):
        with torch.no_grad():
            q, s, z = wq(torch.randn(64, 4096))
    print(int(q.max()))
""")


@needs_numba
def test_maskless_pass_writes_nothing_outside_its_outputs():
    """Without a mask (inference) the pass must not write a mask through its empty
    placeholder: a fresh process quantizing long weights that way exits normally."""
    run = fresh(_MASKLESS)
    assert run.returncode == 0, run.stderr[-500:]
    assert run.stdout.split()[-1] == "255"
    w = torch.randn(4, 300, generator=torch.Generator().manual_seed(2))
    q, none, s, z, finite = Q._fused_channel_quant(w, Q.WeightQuantizer(8, False), mask=False)
    assert none is None and finite and torch.equal(q, torch_reference(w, Q.WeightQuantizer(8, False))[0])


# --- int8 GEMM accumulator ----------------------------------------------------------------

INT8_CASES = [  # (columns, k, unfolded): an int8 activation table, two digit planes; the Zw cross term
    (4, 300, False), (6, 600, False), (8, 100, True),
]


@needs_numba
@pytest.mark.parametrize("columns, k, unfolded", INT8_CASES)
def test_int8_accumulator_torch_passes_and_the_numba_switch(columns, k, unfolded, monkeypatch):
    """The accumulator against the numpy brute force: by the numba epilogue for float32
    codes, by the torch passes with ``APPMULT_NO_NUMBA=1`` (README: "the torch paths") and
    for float16/float64 codes (``approx_linear`` with a cache passes them here; numba has
    no float16)."""
    n = 6
    table, layer, x, (qx, sx, zx, qw, sw, zw), fold = quantized_case(columns, False, k, n)
    prep = FU._int8_unfolded_prep(qw, zx, zw, layer.lut) if unfolded else FU._int8_linear_prep(fold, layer.lut)
    assert prep is not False and layer.lut.u_is_value is False
    assert (prep[5] is not None) == unfolded and prep[-1] == 2
    want = brute_acc(table, qx.numpy(), float(zx), qw.numpy(), zw.numpy(), False).astype(np.float32)
    calls = []
    real = FU.loops.epilogue
    monkeypatch.setattr(FU.loops, "epilogue", lambda *a: calls.append(1) or real(*a))
    for numba_on in (True, False):
        with pytest.MonkeyPatch.context() as mp:
            if not numba_on:
                mp.setenv("APPMULT_NO_NUMBA", "1")
            calls.clear()
            got = FU._int8_linear_acc(qx, prep, layer.lut)
            assert got.dtype == torch.float32 and bool(calls) == numba_on
            np.testing.assert_array_equal(got.numpy(), want)
    for dt in (torch.float16, torch.float64):
        calls.clear()
        got = FU._int8_linear_acc(qx.to(dt), prep, layer.lut)
        assert not calls
        np.testing.assert_array_equal(got.numpy(), want)
