"""Checkpoint files: written atomically, sealed with a content hash, read without unpickling code.

A checkpoint (and a pretrained model file) holds only tensors and plain Python
containers and is read with ``torch.load(weights_only=True)``: loading never unpickles
arbitrary objects. Each file carries the SHA-256 of its contents as one more record in
torch's zip archive (so it stays an ordinary torch file), checked on every load: a
corrupt or modified file is refused, never resumed from.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch

from ..errors import MissingFileError, UserError
from ..files import atomic_writer

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_NAME", "PRETRAINED_FORMAT", "CheckpointError", "load_checkpoint",
           "load_sealed", "read_torch_file", "save_checkpoint", "save_torch"]

#: File name of the per-run checkpoint written after every epoch.
CHECKPOINT_NAME = "last.pt"
CHECKPOINT_FORMAT = "appmult.training.checkpoint/1"
PRETRAINED_FORMAT = "appmult.training.pretrained/1"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file exists but cannot be used (corrupt, foreign, or another run's)."""


_HASH_RECORD = "appmult.sha256"


def _records_digest(archive: zipfile.ZipFile, skip: str | None) -> str:
    h = hashlib.sha256()
    for info in sorted(archive.infolist(), key=lambda i: i.filename):
        if info.filename == skip:
            continue
        h.update(f"{info.filename}\0{info.file_size}\0".encode())
        with archive.open(info) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _seal(path: Path) -> None:
    """Add the SHA-256 of every record to the torch archive at ``path``."""
    with zipfile.ZipFile(path, "a") as archive:
        names = archive.namelist()
        prefix = names[0].split("/", 1)[0] if names and "/" in names[0] else "archive"
        archive.writestr(f"{prefix}/{_HASH_RECORD}", _records_digest(archive, None))


def _seal_state(path: Path) -> bool | None:
    """True: ``path`` carries a hash that matches its records; False: one that does not
    (or records that fail their zip checksum); None: no hash (or not a zip archive)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return None
    with archive:
        record = next((n for n in archive.namelist() if n.rsplit("/", 1)[-1] == _HASH_RECORD), None)
        if record is None:
            return None
        try:
            return archive.read(record).decode("ascii") == _records_digest(archive, record)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, zlib.error):
            return False


def save_torch(path: Path, obj: Any) -> None:
    with atomic_writer(path) as tmp:
        torch.save(obj, tmp)
        _seal(tmp)


def _torch_load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def read_torch_file(path: str | os.PathLike) -> Any:
    """Read any torch file with weights only (a :func:`fit` checkpoint, a :func:`pretrain_fp32`
    model, a plain ``state_dict``), on the CPU; a file that carries appmult's content hash is
    verified first.

    For files a user names (``--checkpoint``): the errors say what the file is, never how
    to load it unsafely.

    Args:
        path: The file.

    Returns:
        What the file holds (tensors and plain containers).

    Raises:
        FileNotFoundError: If ``path`` does not exist or is a directory.
        CheckpointError: If the file is not a torch file, holds other objects than tensors and
            plain containers, or does not match the content hash it carries.
    """
    path = Path(path)
    if path.is_dir():
        raise MissingFileError(f"Checkpoint {path} is a directory, not a file")
    if not path.is_file():
        raise MissingFileError(f"Checkpoint {path} does not exist")
    if _seal_state(path) is False:
        raise CheckpointError(f"Checkpoint {path} does not match the content hash stored with it: it is "
                              f"corrupt or was modified")
    try:
        return _torch_load(path)
    except pickle.UnpicklingError:
        if zipfile.is_zipfile(path):
            raise CheckpointError(f"Checkpoint {path} holds objects other than tensors and plain containers; "
                                  f"appmult reads only weights and never unpickles code") from None
        raise CheckpointError(f"Checkpoint {path} is not an appmult or torch checkpoint file") from None
    except Exception:  # torch raises several types for foreign or damaged files
        raise CheckpointError(f"Checkpoint {path} is not an appmult or torch checkpoint file") from None


def load_sealed(path: Path, fmt: str, what: str, advice: str) -> dict[str, Any] | None:
    """A file of format ``fmt`` written by :func:`_save_torch`, verified (None: another format);
    messages name the file as ``what`` and end in ``advice``."""
    sealed = _seal_state(path)
    if sealed is False:
        raise CheckpointError(f"{what} {path} does not match the content hash stored with it: it is corrupt "
                              f"or was modified; {advice}")
    try:
        state = _torch_load(path)
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        raise CheckpointError(f"{what} {path} is corrupt or not a torch file; {advice}") from exc
    if not isinstance(state, dict) or state.get("format") != fmt:
        return None  # the caller says what it is not
    if sealed is None:
        raise CheckpointError(f"{what} {path} carries no content hash (written by another program or an "
                              f"older appmult); {advice}")
    return state


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`fit` (on the CPU, ``weights_only=True``), verified
    against the content hash stored in it.

    Args:
        path: The checkpoint file (``<checkpoint_dir>/last.pt``).

    Returns:
        Dict with ``epoch`` (completed epochs), ``model``, ``optimizer``, ``scheduler``
        (state dicts), ``rng``, ``history`` and ``run`` (seed and schedule).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        CheckpointError: If the file is unreadable, not a :func:`fit` checkpoint, or does not
            match its content hash (one flipped bit is enough).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"No checkpoint at {path}")
    state = load_sealed(path, CHECKPOINT_FORMAT, "Checkpoint", "delete it or pass resume=False")
    if state is None:
        raise CheckpointError(f"{path} is not an appmult training checkpoint; delete it "
                              f"or pass resume=False")
    return state


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    save_torch(path, state)
