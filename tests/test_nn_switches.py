"""The environment switches of the layer paths (:mod:`appmult.nn.switches`) read what
``os.environ.get`` reads, at each call: set, changed, emptied and removed through
``os.environ`` (``monkeypatch`` writes through it), and non-ASCII values."""

from __future__ import annotations

import os

import pytest

from appmult.nn import switches

NAME = "APPMULT_TEST_SWITCH_READ"


@pytest.mark.parametrize("raw", [None, "", "0", "1", "yes", " ", "caf\u00e9", "\udcff"])
def test_value_and_is_set_agree_with_os_environ(raw, monkeypatch):
    if raw is None:
        monkeypatch.delenv(NAME, raising=False)
    else:
        monkeypatch.setenv(NAME, raw)
    assert switches.value(NAME) == os.environ.get(NAME, "")
    assert switches.value(NAME, "dflt") == os.environ.get(NAME, "dflt")
    assert switches.is_set(NAME) == (os.environ.get(NAME, "") != "")


def test_changes_are_seen_at_the_next_read(monkeypatch):
    monkeypatch.delenv(NAME, raising=False)
    assert not switches.is_set(NAME) and switches.value(NAME, "1") == "1"
    monkeypatch.setenv(NAME, "1")
    assert switches.is_set(NAME) and switches.value(NAME) == "1"
    monkeypatch.setenv(NAME, "")
    assert not switches.is_set(NAME) and switches.value(NAME, "x") == ""
    monkeypatch.setenv(NAME, "2")
    assert switches.value(NAME) == "2"
    monkeypatch.delenv(NAME)
    assert not switches.is_set(NAME) and switches.value(NAME, "d") == "d"


def test_the_layer_switches_follow_the_environment(monkeypatch):
    from appmult.nn import functional as FN
    from appmult.nn import kernels as K
    monkeypatch.delenv("APPMULT_NO_FUSED_LOWRANK", raising=False)
    assert FN._fused_on(None, "APPMULT_NO_FUSED_LOWRANK")
    monkeypatch.setenv("APPMULT_NO_FUSED_LOWRANK", "1")
    assert not FN._fused_on(None, "APPMULT_NO_FUSED_LOWRANK")
    assert FN._fused_on(True, "APPMULT_NO_FUSED_LOWRANK")     # the module override wins
    monkeypatch.setenv("APPMULT_NO_NUMBA", "1")
    assert not K.numba_available()
    monkeypatch.setenv("APPMULT_KERNEL_PROBE", "0")
    assert not K.probe_enabled()
    monkeypatch.delenv("APPMULT_KERNEL_PROBE")
    assert K.probe_enabled()


def test_numba_marked_tests_skip_exactly_where_the_numba_paths_are_off(monkeypatch):
    """conftest's hook: an item marked ``numba`` gets a skip under ``APPMULT_NO_NUMBA`` (and
    without numba); unmarked items and every item with the numba paths on are left alone."""
    import conftest

    from appmult.nn import quant_loops

    class Item:
        def __init__(self, marked):
            self.marked, self.added = marked, []

        def get_closest_marker(self, name):
            return object() if (self.marked and name == "numba") else None

        def add_marker(self, mark):
            self.added.append(mark)

    for off in (False, True):
        if off:
            monkeypatch.setenv("APPMULT_NO_NUMBA", "1")
        else:
            monkeypatch.delenv("APPMULT_NO_NUMBA", raising=False)
        items = [Item(True), Item(False)]
        conftest._skip_numba_tests(items)
        skipped = off or not quant_loops.AVAILABLE
        assert [len(i.added) for i in items] == [int(skipped), 0]
        if skipped:
            assert items[0].added[0].name == "skip"


def test_a_name_never_read_before_is_encoded_and_read(monkeypatch):
    """A fresh name (so its key is encoded here, not by an earlier test: the encoded keys are
    kept per process) reads what was set, and again from the kept key."""
    import uuid
    name = f"APPMULT_TEST_FRESH_{uuid.uuid4().hex}"
    monkeypatch.setenv(name, "on")
    assert switches.is_set(name) and switches.value(name) == "on"
    assert switches.is_set(name) and switches.value(name, "d") == "on"
    fresh = f"APPMULT_TEST_FRESH_{uuid.uuid4().hex}"
    monkeypatch.setenv(fresh, "1")
    assert switches.value(fresh, "d") == "1"
