"""The verify API: exported Verilog against a LUT file, in Icarus Verilog or Verilator via cocotb.

Each function writes everything its simulation needs into a build directory (its own
temporary one, or a given one locked for the run) -- the
design's Verilog (and for a multiplier a wrapper of ``lanes`` instances,
:mod:`appmult.tb.verilog`), the LUT file, the operands (:mod:`appmult.tb.stimulus`) and a
JSON config -- and runs one in-simulator test module through
:func:`appmult.tb.simulators.run_test_module`: :mod:`appmult.tb.multiplier_tests`,
:mod:`appmult.tb.mac_tests` or :mod:`appmult.tb.mac_correction_tests`, loaded by dotted
name. Those compare every output with the LUT and write a JSON result, read back here
into a :mod:`appmult.tb.results` object.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from ..errors import InvalidTypeError, InvalidValueError
from ..hdl import MacUnit, Multiplier, export_verilog
from ..lut_gen.lutfile import LutFile, load as load_lut
from .results import MacVerifyResult, Mismatch, VerifyResult
from .simulators import SimulationError, check_simulator, run_test_module
from .stimulus import mac_correction_stimulus, mac_stimulus, operand_pairs
from .verilog import WRAPPER, design_verilog, wrapper_verilog

__all__ = ["run_mac", "run_mac_correction", "verify_mac", "verify_multiplier"]


def _load_lut(lut: LutFile | str | os.PathLike) -> LutFile:
    if isinstance(lut, LutFile):
        return lut
    if isinstance(lut, (str, os.PathLike)):
        return load_lut(lut)
    raise InvalidTypeError(f"lut must be a LutFile or the path of a LUT file, not {lut!r}")


#: Lock file in a given build directory (see :func:`_build_directory`).
LOCK_FILE = ".appmult-tb.lock"


@contextlib.contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    """Hold ``directory``'s lock: waits while another run (thread or process) holds it."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): runs may collide, but a foreign result is still refused
        yield
        return
    # flock locks belong to the open file, so two threads of one process exclude each other too.
    with open(directory / LOCK_FILE, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _build_directory(build_dir: str | os.PathLike | None) -> Iterator[tuple[Path, bool]]:
    """The build directory and whether it is kept (given) or temporary (removed after).

    A given directory is locked for the whole run -- writing the bench, building,
    simulating, reading the verdict --, so that runs sharing it take turns instead of
    overwriting each other's files and reading each other's results.
    """
    if build_dir is not None:
        path = Path(build_dir).resolve()
        path.mkdir(parents=True, exist_ok=True)
        with _exclusive(path):
            yield path, True
        return
    with tempfile.TemporaryDirectory(prefix="appmult-tb-") as tmp:
        yield Path(tmp), False


# -- multiplier -------------------------------------------------------------------------------

def _check_multiplier_args(*, lanes, max_report, registered) -> None:
    if not isinstance(lanes, int) or isinstance(lanes, bool) or not 1 <= lanes <= 256:
        raise InvalidValueError(f"lanes must be an integer in 1..256, not {lanes!r}")
    if not isinstance(max_report, int) or isinstance(max_report, bool) or max_report < 0:
        raise InvalidValueError(f"max_report must be a non-negative integer, not {max_report!r}")
    if not isinstance(registered, bool):
        raise InvalidTypeError(f"registered must be a bool, not {registered!r}")


def _write_multiplier_bench(bdir: Path, *, verilog: str, top: str, table: LutFile, pairs: np.ndarray,
                            lanes: int, registered: bool, max_report: int) -> tuple[list[Path], dict[str, Any]]:
    """Write the design, its wrapper, the LUT and the pairs into ``bdir``; the sources and config.

    The config names the pairs file under ``pairs``; it is one of the run's inputs.
    """
    wa, wb = table.width_a, table.width_b
    dut_path = bdir / f"{top}.v"
    dut_path.write_text(verilog)
    wrapper_path = bdir / f"{WRAPPER}.v"
    wrapper_path.write_text(wrapper_verilog(top, lanes=lanes, width_a=wa, width_b=wb, width_p=wa + wb,
                                            registered=registered))
    lut_path = bdir / "reference_lut.npz"
    table.save(lut_path)
    np.save(bdir / "pairs.npy", pairs)
    config = {"kind": "multiplier", "lut": str(lut_path), "pairs": str(bdir / "pairs.npy"),
              "lanes": lanes, "width_a": wa, "width_b": wb, "width_p": wa + wb,
              "signed": table.signed, "registered": registered, "max_report": max_report}
    return [dut_path, wrapper_path], config


def verify_multiplier(design, lut: LutFile | str | os.PathLike, *, sim: str = "icarus",
                      registered: bool = False, build_dir: str | os.PathLike | None = None,
                      seed: int = 0, max_pairs: int | None = None, name: str | None = None,
                      max_report: int = 10, lanes: int = 16) -> VerifyResult:
    """Simulate a multiplier's Verilog and compare every product with a LUT file.

    Operands of at most :data:`~appmult.tb.EXHAUSTIVE_MAX_WIDTH` bits are checked
    exhaustively (every pair); wider ones (or when ``max_pairs`` is below the pair count)
    with every combination of corner cases (:func:`~appmult.tb.corner_codes`) plus a
    seeded random sample.

    Args:
        design: an :class:`appmult.hdl.Multiplier` (exported here), Verilog text, or the
            path of a ``.v`` file with ports ``a``, ``b``, ``p`` (and ``clk``, ``rst`` when
            registered).
        lut: the reference: a :class:`LutFile` or the path of a LUT file.
        sim: ``"icarus"`` (default) or ``"verilator"``.
        registered: the design registers its output (one cycle latency, ``clk``/``rst``);
            a multiplier given as a component is then exported with ``registered=True``.
        build_dir: where to build (kept afterwards); default a temporary directory. Runs
            sharing one take turns (it is locked while a run uses it).
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
    _check_multiplier_args(lanes=lanes, max_report=max_report, registered=registered)
    table = _load_lut(lut)
    if isinstance(design, Multiplier):
        table.check_compatible(width_a=design.width_a, width_b=design.width_b, signed=design.signed,
                               what=f"multiplier {design.spec}")
    verilog, top = design_verilog(design, name=name, registered=registered)
    if top == WRAPPER:
        raise InvalidValueError(f"Module name {WRAPPER!r} is reserved for the testbench wrapper")
    pairs, exhaustive = operand_pairs(table.width_a, table.width_b, table.signed, seed=seed,
                                      max_pairs=max_pairs)
    with _build_directory(build_dir) as (bdir, keep):
        sources, config = _write_multiplier_bench(bdir, verilog=verilog, top=top, table=table, pairs=pairs,
                                                  lanes=min(lanes, len(pairs)), registered=registered,
                                                  max_report=max_report)
        result, build_s, run_s = run_test_module(sim=sim, build_dir=bdir, sources=sources, toplevel=WRAPPER,
                                                 test_module="appmult.tb.multiplier_tests", config=config,
                                                 inputs=[Path(config["pairs"])], lut_sha256=table.sha256,
                                                 kept=keep)
        return VerifyResult(passed=result["mismatch_count"] == 0 and result["pairs_checked"] == len(pairs),
                            pairs_checked=result["pairs_checked"], exhaustive=exhaustive,
                            mismatch_count=result["mismatch_count"],
                            mismatches=tuple(Mismatch(**m) for m in result["mismatches"]),
                            simulator=sim, build_s=build_s, run_s=run_s,
                            build_dir=str(bdir) if keep else None,
                            build_cpu_s=result["build_cpu_s"], run_cpu_s=result["run_cpu_s"],
                            pairs_total=1 << (table.width_a + table.width_b))


# -- MAC --------------------------------------------------------------------------------------

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
        inputs = []
        # What the testbench compares against: given accumulators (an input file), else the LUT.
        reference_lut = lut.sha256 if lut is not None and expected is None else None
        if stimulus is not None:
            # The beats travel as a file: JSON would be slow and lossy for large arrays.
            arrays = dict(stimulus)
            if expected is not None:
                arrays["expected"] = expected
            np.savez(bdir / "stimulus.npz", **arrays)
            config["stimulus"] = str(bdir / "stimulus.npz")
            config["cycles"] = int(stimulus["a"].shape[0])
            inputs.append(bdir / "stimulus.npz")
        result, build_s, run_s = run_test_module(sim=sim, build_dir=bdir, sources=[dut_path], toplevel=name,
                                                 test_module="appmult.tb.mac_tests", config=config,
                                                 inputs=inputs, lut_sha256=reference_lut, kept=keep)
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
        build_dir: where to build (kept; runs sharing one take turns); default a temporary directory.
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
    st = mac_stimulus(mac, stimulus)
    check_simulator(sim)
    result = _simulate_mac(mac, lut=None, stimulus=st, expected=None, sim=sim, build_dir=build_dir, seed=0,
                           cycles=int(st["a"].shape[0]), name=name, max_report=10)
    if result.mismatch_count:
        first = result.mismatches[0] if result.mismatches else {}
        raise SimulationError(f"MAC {mac!r} misbehaved in {sim} on {result.mismatch_count} of {result.cycles} "
                              f"beats (valid_out not following valid_in, or X/Z on acc); first: {first}")
    return np.array(result.acc, dtype=np.int64)


def _expected_accumulators(expected, st: dict[str, np.ndarray] | None) -> np.ndarray | None:
    """Validated ``expected`` accumulators (one per beat of ``st``), or None when not given."""
    if expected is None:
        return None
    if st is None:
        raise InvalidValueError("expected accumulators need a stimulus (the random beats are drawn in the testbench)")
    want = np.asarray(expected)
    if want.shape != st["valid"].shape or not np.issubdtype(want.dtype, np.integer):
        raise InvalidValueError(f"expected must be {len(st['valid'])} integers (acc after each beat), "
                                f"not {want.dtype} of shape {want.shape}")
    return want.astype(np.int64)


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
        build_dir: where to build (kept; runs sharing one take turns); default a temporary directory.
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
                           what=f"the MAC's multiplier {mult.spec}", width_p=mult.width_p)
    st = None if stimulus is None else mac_stimulus(mac, stimulus)
    want = _expected_accumulators(expected, st)
    return _simulate_mac(mac, lut=table, stimulus=st, expected=want, sim=sim, build_dir=build_dir, seed=seed,
                         cycles=cycles, name=name, max_report=max_report)


# -- MAC with the control-variate correction --------------------------------------------------

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
                         what=f"the MAC's multiplier {mult.spec}", width_p=mult.width_p)
    st = mac_correction_stimulus(mac, stimulus)
    with _build_directory(build_dir) as (bdir, keep):
        dut = bdir / f"{name}.v"
        dut.write_text(export_verilog(mac, name=name))
        lut_path = bdir / "reference_lut.npz"
        lut.save(lut_path)
        stim_path = bdir / "stimulus.npz"
        np.savez(stim_path, **{k: v.astype(np.int64) for k, v in st.items()})
        config = {"lut": str(lut_path), "stimulus": str(stim_path), "signed": mult.signed,
                  "acc_width": mac.acc_width, "sum_width": mac.sum_width, "frac_bits": mac.alpha_frac_bits,
                  "latency": mac.latency, "max_report": max_report}
        result, build_s, run_s = run_test_module(sim=sim, build_dir=bdir, sources=[dut], toplevel=name,
                                                 test_module="appmult.tb.mac_correction_tests", config=config,
                                                 inputs=[stim_path], lut_sha256=lut.sha256, kept=keep)
    result.update(build_s=build_s, run_s=run_s)
    return result
