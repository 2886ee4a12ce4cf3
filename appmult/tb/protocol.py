"""The exchange between a host-side run and an in-simulator test module: a JSON config in, a JSON result out.

The host (:func:`appmult.tb.simulators.run_test_module`) writes ``config.json`` into the
build directory with :func:`write_tb_config` and starts the simulator with
:data:`CONFIG_ENV` pointing at it; the cocotb test module reads it with
:func:`read_tb_config`, drives the design and writes its verdict with
:func:`write_tb_result` to the path the config names; the host reads that back with
:func:`read_tb_result`. A testbench problem travels as a result holding ``"error"``.

A verdict is only as good as the knowledge of what it is about. Each run has an id; the
result carries it, the content hash of the LUT the test module compared against and the
hashes of the Verilog and data files it used, and the host refuses a result whose
identity differs from what it wrote (:func:`identity_problem`) -- e.g. one written by
another run in the same build directory.

Standard library only: the in-simulator modules import this inside the simulator.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = ["CONFIG_ENV", "file_sha256", "identity_problem", "read_tb_config", "read_tb_result", "write_tb_config",
           "write_tb_result"]

#: Environment variable holding the path of the JSON config the cocotb side reads.
CONFIG_ENV = "APPMULT_TB_CONFIG"
_CONFIG_FILE = "config.json"
_RESULT_FILE = "result.json"


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _hashes(paths: Iterable[str | os.PathLike]) -> dict[str, str]:
    return {Path(p).name: file_sha256(p) for p in paths}


def _write_json(path: Path, obj: Any) -> None:
    # Renamed into place: a reader never sees half a file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# -- host side --------------------------------------------------------------------------------

def write_tb_config(build_dir: Path, config: Mapping[str, Any], *, sources: Iterable[Path] = (),
                    inputs: Iterable[Path] = (), lut_sha256: str | None = None
                    ) -> tuple[dict[str, str], dict[str, Any]]:
    """Write ``config`` (plus this run's id, its files and where the result goes) into ``build_dir``.

    A stale result is removed first. The result the test module writes must name this
    run and carry the identity of what it checked (:func:`identity_problem`).

    Args:
        build_dir: the build directory.
        config: settings for the test module.
        sources: the Verilog files the design was built from.
        inputs: the data files the test module reads (operand pairs, stimulus).
        lut_sha256: content hash of the reference LUT the test module loads, if any.

    Returns:
        The environment variable (``{CONFIG_ENV: path}``) that points the test module at
        the config, and the identity its result must carry.
    """
    sources, inputs = list(sources), list(inputs)
    result_path = build_dir / _RESULT_FILE
    result_path.unlink(missing_ok=True)
    expect = {"run_id": uuid.uuid4().hex, "lut_sha256": lut_sha256, "verilog_sha256": _hashes(sources),
              "inputs_sha256": _hashes(inputs)}
    config_path = build_dir / _CONFIG_FILE
    _write_json(config_path, dict(config, result=str(result_path), run_id=expect["run_id"],
                                  sources=[str(p) for p in sources], inputs=[str(p) for p in inputs]))
    return {CONFIG_ENV: str(config_path)}, expect


def read_tb_result(build_dir: Path) -> dict[str, Any] | None:
    """The result a test module wrote into ``build_dir``, or None when it wrote none.

    Check it with :func:`identity_problem` before trusting it.
    """
    path = build_dir / _RESULT_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _lut_name(sha256: str | None) -> str:
    return f"LUT {sha256[:16]}" if sha256 else "no LUT"


def identity_problem(result: Mapping[str, Any], expect: Mapping[str, Any], build_dir: Path) -> str | None:
    """Why ``result`` (read from ``build_dir``) is not the verdict of the run ``expect`` describes, or None.

    A result must name this run, and -- unless it reports a testbench error -- the LUT it
    compared against (content hash) and the Verilog and data files it used (file hashes)
    must be the ones this run wrote.
    """
    path = build_dir / _RESULT_FILE
    theirs = result.get("run_id")
    if theirs != expect["run_id"]:
        return (f"The result in {path} belongs to another run (run {theirs!r}, this run {expect['run_id']!r}): "
                f"another verification is using build directory {build_dir}")
    if result.get("error"):
        return None
    if result.get("lut_sha256") != expect["lut_sha256"]:
        return (f"The result in {path} checked {_lut_name(result.get('lut_sha256'))}, not "
                f"{_lut_name(expect['lut_sha256'])} of this run")
    for key, what in (("verilog_sha256", "checked other Verilog"), ("inputs_sha256", "used other data files")):
        got, want = result.get(key) or {}, expect[key]
        differ = sorted(n for n in set(got) | set(want) if got.get(n) != want.get(n))
        if differ or key not in result:
            return f"The result in {path} {what} than this run wrote ({', '.join(differ) or 'none named'})"
    return None


# -- in-simulator side ------------------------------------------------------------------------

def read_tb_config(entry: str) -> dict[str, Any]:
    """The JSON config a runner function passed to an in-simulator test module.

    Args:
        entry: the runner function that starts this test module (named in the error).

    Raises:
        RuntimeError: the module was started without a config (not through ``entry``).
    """
    path = os.environ.get(CONFIG_ENV)
    if not path:
        raise RuntimeError(f"{CONFIG_ENV} is not set: run these tests through {entry}")
    with open(path) as f:
        return json.load(f)


def write_tb_result(cfg: Mapping[str, Any], result: Mapping[str, Any], *, lut: Any = None) -> None:
    """Write a test module's result JSON where the runner reads it (atomically: rename).

    The result is stamped with the run's id and the identity of what it checked: the
    content hash of ``lut`` (the reference it compared against, as loaded), and the hashes
    of the Verilog sources and data files the config names. A testbench error carries the
    run's id only.
    """
    stamped = dict(result, run_id=cfg.get("run_id"))
    if not result.get("error"):
        stamped.update(lut_sha256=None if lut is None else lut.sha256,
                       verilog_sha256=_hashes(cfg.get("sources", ())), inputs_sha256=_hashes(cfg.get("inputs", ())))
    _write_json(Path(cfg["result"]), stamped)
