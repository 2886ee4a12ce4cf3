"""The ``APPMULT_*`` environment switches of the layer paths, read at each call at a dict
lookup's cost.

Every forward reads several switches (``APPMULT_NO_NUMBA``, ``APPMULT_NO_FUSED_LOWRANK``,
``APPMULT_NO_EVAL_PLAN`` ...) so that setting one takes effect at the next call. Through
``os.environ.get`` each read costs about 0.75 us here (the key encoded, the value decoded);
a training step of a small layer made eleven of them. On POSIX ``os.environ`` keeps the
environment in a plain dict of bytes (``os.environ._data``, updated by every write through
``os.environ``, which is the only way Python code changes what ``os.environ.get`` sees), so
the same read is one dict look-up of a pre-encoded key (0.04 us). Elsewhere (Windows, or an
interpreter without that dict) :func:`value` is ``os.environ.get``.
"""

from __future__ import annotations

import os

__all__ = ["is_set", "value"]

#: The dict behind ``os.environ`` (bytes keys and values), or ``None`` where there is none.
_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None
if not isinstance(_DATA, dict):  # pragma: no cover - not POSIX CPython
    _DATA = None
#: Encoded keys, as ``os.environ`` encodes them.
_KEYS: dict[str, bytes] = {}


def value(name: str, default: str = "") -> str:
    """``os.environ.get(name, default)``, read now."""
    if _DATA is None:  # pragma: no cover - not POSIX CPython
        return os.environ.get(name, default)
    raw = _DATA.get(_KEYS.get(name) or _key(name))
    return default if raw is None else os.fsdecode(raw)


def is_set(name: str) -> bool:
    """Whether ``name`` is set to a non-empty value (``os.environ.get(name, "") != ""``), read now."""
    if _DATA is None:  # pragma: no cover - not POSIX CPython
        return os.environ.get(name, "") != ""
    return bool(_DATA.get(_KEYS.get(name) or _key(name)))


def _key(name: str) -> bytes:
    """``name`` encoded as ``os.environ`` encodes its keys, kept for the next read."""
    key = _KEYS[name] = os.fsencode(name)
    return key
