"""glibc's malloc kept from returning freed tensors to the kernel (``appmult.heap``).

Reference: the kernel's own count of minor page faults (``getrusage``) in a fresh process
that allocates and frees a training step's worth of 2-4 MiB blocks, with the settings and
with the opt-out.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from appmult import heap

CHURN = textwrap.dedent("""
    import resource, sys
    import numpy as np
    {setup}
    def step():
        a = np.ones(1 << 20, np.float32); b = np.ones(1 << 20, np.float32); c = np.ones(1 << 19, np.float32)
        del a, b, c
    step()
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
""")


def faults(setup: str, **env) -> int:
    """Minor page faults of ten steps of the churn in a fresh process."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "APPMULT_NO_MALLOPT"}
    out = subprocess.run([sys.executable, "-c", CHURN.format(setup=setup)], env={**environ, **env},
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1])


needs_glibc = pytest.mark.skipif(heap._glibc_mallopt() is None, reason="glibc's malloc only")


@needs_glibc
def test_freed_blocks_stay_in_the_process():
    # 10 steps x 10 MiB = 25,600 pages: with glibc's defaults nearly all fault back in
    untouched = faults("")
    assert untouched > 10_000
    assert faults("from appmult.heap import keep_freed_memory; assert keep_freed_memory()") < 100
    # importing the layers or the training loop sets it
    assert faults("import appmult.nn") < 100
    assert faults("import appmult.train") < 100


@needs_glibc
@pytest.mark.parametrize("env", [{"APPMULT_NO_MALLOPT": "1"}, {"MALLOC_ARENA_MAX": "2"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}])
def test_opt_out_and_user_settings_leave_malloc_alone(env):
    assert faults("from appmult.heap import keep_freed_memory; assert not keep_freed_memory()", **env) > 10_000


@pytest.mark.parametrize("environ, chosen", [
    ({}, None),
    ({"APPMULT_NO_MALLOPT": "0"}, None),
    ({"APPMULT_NO_MALLOPT": ""}, None),
    ({"APPMULT_NO_MALLOPT": "1"}, "APPMULT_NO_MALLOPT"),
    ({"MALLOC_TRIM_THRESHOLD_": "0"}, "MALLOC_TRIM_THRESHOLD_"),
    ({"MALLOC_MMAP_THRESHOLD_": "65536"}, "MALLOC_MMAP_THRESHOLD_"),
    ({"MALLOC_TOP_PAD_": "0"}, "MALLOC_TOP_PAD_"),
    ({"MALLOC_MMAP_MAX_": "0"}, "MALLOC_MMAP_MAX_"),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, "GLIBC_TUNABLES"),
    ({"GLIBC_TUNABLES": "glibc.rtld.nns=2"}, None),
])
def test_user_chose(environ, chosen):
    assert heap.user_chose(environ) == chosen


def test_no_glibc_changes_nothing(monkeypatch):
    monkeypatch.setattr(heap, "_done", None)
    monkeypatch.setattr(heap, "_glibc_mallopt", lambda: None)
    monkeypatch.delenv("APPMULT_NO_MALLOPT", raising=False)
    assert heap.keep_freed_memory() is False
    assert heap.keep_freed_memory() is False  # once per process: the answer is kept


def test_refused_parameter_reports_false(monkeypatch):
    """``mallopt`` returns 0 for a parameter it refuses: not reported as in effect."""
    calls = []
    monkeypatch.setattr(heap, "_done", None)
    monkeypatch.setattr(heap, "_glibc_mallopt", lambda: lambda p, v: calls.append((p, v)) or 0)
    for name in ("APPMULT_NO_MALLOPT", *heap._USER_SETTINGS, "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    assert heap.keep_freed_memory() is False
    assert calls == [(heap.M_MMAP_MAX, 0)]
