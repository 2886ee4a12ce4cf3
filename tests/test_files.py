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


# A rename over a device, pipe or symbolic link would replace it with a plain file
# (`appmult export -o /dev/full` as root did); found by fuzzing the CLI.

def test_a_pipe_is_refused_and_kept(tmp_path):
    from appmult.errors import UsageError
    from appmult.files import check_output_file
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match="not a regular file"):
        check_output_file(fifo)
    with pytest.raises(UsageError, match="not a regular file"):
        atomic_write_text(fifo, "x")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["pipe"]  # no temporary left behind


def test_a_device_is_refused(tmp_path):
    from appmult.errors import UsageError
    from appmult.files import check_output_file
    if not os.path.exists("/dev/null"):
        pytest.skip("no /dev/null here")
    with pytest.raises(UsageError, match="not a regular file"):
        check_output_file("/dev/null")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_a_symlink_stays_a_link_and_its_target_is_written(tmp_path):
    from appmult.files import check_output_file
    target = tmp_path / "real.v"
    target.write_text("old")
    link = tmp_path / "link.v"
    link.symlink_to(target)
    assert check_output_file(link) == link
    atomic_write_text(link, "new")
    assert link.is_symlink() and link.read_text() == "new" and target.read_text() == "new"
    dangling = tmp_path / "dangling.v"
    dangling.symlink_to(tmp_path / "sub" / "made.v")
    atomic_write_text(dangling, "made")
    assert dangling.is_symlink() and (tmp_path / "sub" / "made.v").read_text() == "made"
