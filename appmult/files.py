"""Atomic file writes (a reader never sees a half-written file, a crash never loses the old one),
and output-path checks that run before the work whose results they will hold."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

from .errors import UsageError

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_writer", "check_output_dir", "check_output_file"]


class atomic_writer:
    """Context manager yielding a temporary path next to ``path``; renamed over it on success.

    Example:
        with atomic_writer("lut.npz") as tmp:
            np.savez(tmp, ...)
    """

    def __init__(self, path: str | os.PathLike, suffix: str | None = None):
        self.path = _target(Path(path))
        self.suffix = Path(path).suffix if suffix is None else suffix

    def __enter__(self) -> Path:
        _check_not_special(self.path, "file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=f".tmp{self.suffix}",
                                   dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.tmp.unlink(missing_ok=True)
            return
        try:
            with open(self.tmp, "rb+") as f:
                os.fsync(f.fileno())
            # mkstemp creates the file 0600; give it the mode a plain open() would (umask).
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o666 & ~umask)
            os.replace(self.tmp, self.path)
        except BaseException:
            # e.g. the target is a directory: never leave the temporary behind.
            self.tmp.unlink(missing_ok=True)
            raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_writer(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _target(path: Path) -> Path:
    """The file a write to ``path`` replaces: a symbolic link's target (the link itself stays
    a link, as with a plain ``open``), else ``path``."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _check_not_special(path: Path, what: str) -> None:
    """``path`` is absent, a regular file or a directory -- not a device, pipe or socket,
    which a rename would silently replace with a plain file."""
    if path.exists() and not path.is_file() and not path.is_dir():
        raise UsageError(f"Cannot write {what} {path}: it is not a regular file (a device, pipe or socket), "
                         "and writing would replace it; choose a file path")


def _check_creatable(path: Path, what: str) -> None:
    """``path`` does not exist yet: its nearest existing ancestor must be a writable directory."""
    ancestor = path.parent
    while not ancestor.exists() and ancestor.parent != ancestor:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"Cannot write {what} {path}: {ancestor} is a file, not a directory")
    _check_writable(ancestor, path, what)


def _check_writable(directory: Path, path: Path, what: str) -> None:
    # access(2) knows modes, read-only mounts and immutable directories, and that root
    # ignores modes: it answers what creating a file there would do, without creating one.
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UsageError(f"Cannot write {what} {path}: directory {directory} is not writable")


def check_output_file(path: str | os.PathLike, *, what: str = "output file") -> Path:
    """Check, before any work, that ``path`` can be written as a file (atomically, by :class:`atomic_writer`).

    The file may exist (it will be replaced; a symbolic link's target is, the link stays) and
    its directories may be missing (they will be created); nothing is created by the check.

    Args:
        path: the file to be written.
        what: how the message names it (``"output file"``).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        UsageError: ``path`` is a directory, a device, pipe or socket, a parent is a file,
            or the directory that would hold it is not writable.
    """
    path = Path(path)
    target = _target(path)
    if target.is_dir():
        raise UsageError(f"Cannot write {what} {path}: it is a directory")
    _check_not_special(target, what)
    if target.exists():
        _check_writable(target.parent, path, what)  # replaced by a rename in its directory
    else:
        _check_creatable(target, what)
    return path


def check_output_dir(path: str | os.PathLike, *, files: Iterable[str] = (), what: str = "output directory") -> Path:
    """Check, before any work, that ``path`` can be (created and) written into as a directory.

    Args:
        path: the output directory; it may exist or be created later with its parents.
        files: names of the files the work will write into it; each is checked with
            :func:`check_output_file` (none may be a directory).
        what: how the message names it (``"output directory"``).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        UsageError: ``path`` is a file, a parent is a file, a directory on the way is not
            writable, or one of ``files`` is a directory.
    """
    path = Path(path)
    if path.is_dir():
        _check_writable(path, path, what)
        for name in files:
            check_output_file(path / name)
    elif path.exists():
        raise UsageError(f"Cannot write {what} {path}: it is a file, not a directory")
    else:
        _check_creatable(path, what)
    return path
