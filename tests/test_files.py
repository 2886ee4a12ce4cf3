"""Atomic writes: content, permissions, and no partial file on failure."""

import os
import stat

import pytest

from appmult.files import atomic_write_text, atomic_writer


def test_atomic_write_text(tmp_path):
    path = tmp_path / "sub" / "x.txt"
    atomic_write_text(path, "hello")
    assert path.read_text() == "hello"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    atomic_write_text(path, "again")
    assert path.read_text() == "again"
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.txt"]


def test_atomic_writer_failure_keeps_old_file(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_writer(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]
