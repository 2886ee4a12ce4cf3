"""Shared test helpers: exact-message matching and a one-thread torch fixture."""

from __future__ import annotations

import re

import pytest


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
