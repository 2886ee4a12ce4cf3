"""Shared test helpers: exact-message matching and a one-thread torch fixture.

Under ``make mutate`` (``APPMULT_MUTMUT_WARMUP=1``) this module also imports, once in
mutmut's fork server, what every test process would otherwise load lazily on its first
tensor operation (sympy via torch's symbolic shapes, scipy.linalg, numba's compiler
target): each mutant's tests run in a fresh fork of that server, so this is paid once
instead of once per mutant (about 1 s of the 1.8 s a killed mutant took).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest


def _warm_up_for_mutation_testing() -> None:
    # Only imports and a throw-away numba function: nothing from appmult runs here, so no
    # cache of the code under test is filled before a mutant is switched on.
    import importlib

    # torch._dynamo: the first torch.optim optimizer imports it (0.66 s per fork).
    for name in ("sympy", "torch.fx.experimental.symbolic_shapes", "torch.distributed.tensor", "scipy.linalg",
                 "numba.np.arraymath", "torch._dynamo", "torch.optim"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    try:
        import numba
        import numpy as np
    except ImportError:
        return
    numba.njit(lambda a: a.sum())(np.zeros(2, np.int32))  # initializes numba's LLVM target


_KILLERS: dict[str, dict[str, int]] = {}
_EQUIVALENT: frozenset[str] = frozenset()

if os.environ.get("APPMULT_MUTMUT_WARMUP") == "1":
    _warm_up_for_mutation_testing()
    # Automatic kernel choice by the rank rule instead of the timed probe: each mutant's
    # fork starts with an empty probe cache, and probing every candidate kernel of every
    # layer shape cost about 0.2 s of a killed mutant's 0.5 s; a timed choice would also
    # let the kernel a mutant runs depend on the machine's load. The probe's own tests
    # turn it back on (tests/test_nn_kernel_choice.py).
    os.environ.setdefault("APPMULT_KERNEL_PROBE", "0")
    import mutation_order

    # Loaded once in the fork server; each mutant's fork reads it (tests/mutation_order.py).
    _KILLERS = mutation_order.load(Path(os.environ.get("APPMULT_MUTATION_KILLERS", mutation_order.HISTORY)))
    # this file is mutants/tests/conftest.py under mutmut: the .meta files are beside tests/
    _EQUIVALENT = mutation_order.still_equivalent(
        mutation_order.load_equivalents(Path(os.environ.get("APPMULT_MUTATION_EQUIVALENTS",
                                                            mutation_order.EQUIVALENTS))),
        mutation_order.function_hashes(Path(__file__).resolve().parents[1]))


def _mutant_under_test() -> str | None:
    name = os.environ.get("MUTANT_UNDER_TEST", "")
    return name if os.environ.get("APPMULT_MUTMUT_WARMUP") == "1" and "__mutmut_" in name else None


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one; APPMULT_TEST_DEVICE=cpu "
                                       "runs the file against the CPU)")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``numba`` skip where the numba paths do not run (numba missing, or
    ``APPMULT_NO_NUMBA`` set: ``make test-torch-paths`` runs the suite so, the torch paths
    every CUDA layer takes). Under ``make mutate``: an accepted equivalent mutant is
    skipped; otherwise the tests that killed this function's mutants before run first."""
    _skip_numba_tests(items)
    mutant = _mutant_under_test()
    if mutant is None:
        return
    import mutation_order

    if mutant in _EQUIVALENT:
        pytest.exit("accepted equivalent mutant (tests/mutation_equivalents.tsv)",
                    returncode=mutation_order.SKIP_EXIT_CODE)

    remembered = _KILLERS.get(mutation_order.function_of(mutant), {})
    if remembered:
        order = mutation_order.killer_first([item.nodeid for item in items], remembered)
        items[:] = [items[i] for i in order]


def _skip_numba_tests(items) -> None:
    # (tests of these hooks pass plain objects, without markers)
    marked = [item for item in items if getattr(item, "get_closest_marker", lambda name: None)("numba") is not None]
    if not marked:
        return   # (no import of appmult.nn, and torch, for a run without such tests)
    from appmult.nn.kernels import numba_available

    if not numba_available():
        skip = pytest.mark.skip(reason="numba is not installed or APPMULT_NO_NUMBA is set (the torch paths run)")
        for item in marked:
            item.add_marker(skip)


def pytest_runtest_logreport(report):
    """Under ``make mutate``: log the test that killed the mutant (to order the next run)."""
    mutant = _mutant_under_test()
    if mutant is not None and report.failed:
        import mutation_order

        with open(mutation_order.LOG_NAME, "a") as log:  # cwd: mutants/; one short line
            log.write(f"{mutant}\t{report.nodeid}\n")


def exact(message: str) -> str:
    """A ``pytest.raises(match=...)`` pattern that matches ``message`` whole and literally."""
    return "^" + re.escape(message) + "$"


@pytest.fixture
def one_torch_thread():
    """Run a test with one torch thread: bit-identical reductions between runs compared in
    the test, and politer on a shared 2-core machine."""
    torch = pytest.importorskip("torch")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(params=["scalar", "byte_shuffle"])
def gather_path(request, monkeypatch):
    """Run a test on each CPU gather implementation: the scalar numba loops
    (``APPMULT_NO_BYTE_SHUFFLE=1``) and the byte-shuffle kernel (skipped where the CPU lacks
    AVX-512 VBMI). Both must give the same integers, so gather tests use this fixture."""
    monkeypatch.delenv("APPMULT_NO_BYTE_SHUFFLE", raising=False)
    if request.param == "scalar":
        monkeypatch.setenv("APPMULT_NO_BYTE_SHUFFLE", "1")
    else:
        from appmult.nn import byte_shuffle
        if not byte_shuffle.available():
            pytest.skip("the byte-shuffle gather needs numba and an AVX-512 VBMI CPU")
        from appmult.nn import kernels
        monkeypatch.setattr(byte_shuffle, "MIN_LOOKUPS", 0)  # test sizes are small: take it anyway
        monkeypatch.setattr(kernels, "FLOAT_SHUFFLE_MIN_LOOKUPS", 0)  # (the LUT-2D gradient gathers too)
    return request.param


@pytest.fixture
def shuffle_always(monkeypatch):
    """The byte-shuffle gather for every size (callers normally leave products of fewer than
    ``byte_shuffle.MIN_LOOKUPS`` look-ups to the scalar loops): tests use small sizes."""
    from appmult.nn import byte_shuffle, kernels
    monkeypatch.setattr(byte_shuffle, "MIN_LOOKUPS", 0)
    monkeypatch.setattr(kernels, "FLOAT_SHUFFLE_MIN_LOOKUPS", 0)
