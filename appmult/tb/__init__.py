"""cocotb testbenches and runner glue: exported Verilog checked against LUT files.

``verify_multiplier(design, lut)`` simulates a multiplier's Verilog (Icarus Verilog by
default, or Verilator) and compares every product with the LUT file the network was
trained on; ``verify_mac(mac, lut)`` does the same for a MAC / dot-product unit, and
``run_mac(mac, stimulus)`` drives given operand beats and returns the accumulators. The
in-simulator halves are :mod:`appmult.tb.multiplier_tests` and :mod:`appmult.tb.mac_tests`
(cocotb test modules, loaded by dotted name; importing this package does not import cocotb).
"""

from .runner import (
    EXHAUSTIVE_MAX_WIDTH,
    SIMULATORS,
    MacVerifyResult,
    Mismatch,
    SimulationError,
    SimulatorNotFound,
    VerifyResult,
    check_simulator,
    corner_codes,
    run_mac,
    run_mac_correction,
    simulator_available,
    verify_mac,
    verify_multiplier,
)

__all__ = [
    "EXHAUSTIVE_MAX_WIDTH",
    "SIMULATORS",
    "MacVerifyResult",
    "Mismatch",
    "SimulationError",
    "SimulatorNotFound",
    "VerifyResult",
    "check_simulator",
    "corner_codes",
    "run_mac",
    "run_mac_correction",
    "simulator_available",
    "verify_mac",
    "verify_multiplier",
]
