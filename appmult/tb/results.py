"""What a verification run reports: :class:`VerifyResult`, :class:`MacVerifyResult` and :class:`Mismatch`.

Plain frozen dataclasses, filled by :mod:`appmult.tb.verify` from the JSON result an
in-simulator test module wrote.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["MacVerifyResult", "Mismatch", "VerifyResult"]


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
    """Outcome of :func:`appmult.tb.verify_multiplier`.

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
        pairs_total: every input pair, ``2**(width_a + width_b)`` (None: not recorded).
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
    pairs_total: int | None = None

    def summary(self) -> str:
        """One line: verdict, pairs checked (of how many, when not every one), simulator and times."""
        of = f" of {self.pairs_total}" if self.pairs_total and not self.exhaustive else ""
        kind = "exhaustive" if self.exhaustive else "sampled, not exhaustive"
        verdict = "PASS" if self.passed else f"FAIL ({self.mismatch_count} mismatching pairs)"
        return (f"{verdict}: {self.pairs_checked}{of} pairs checked ({kind}) in {self.simulator}, "
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
    """Outcome of :func:`appmult.tb.verify_mac`.

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
