"""cocotb testbenches: exported Verilog checked against LUT files.

``verify_multiplier(design, lut)`` simulates a multiplier's Verilog (Icarus Verilog by
default, or Verilator) and compares every product with the LUT file the network was
trained on; ``verify_mac(mac, lut)`` does the same for a MAC / dot-product unit, and
``run_mac(mac, stimulus)`` drives given operand beats and returns the accumulators.

Modules, host side: :mod:`~appmult.tb.verify` (the verify API), :mod:`~appmult.tb.results`,
:mod:`~appmult.tb.simulators` (discovery and a cocotb runner carrying its own
environment), :mod:`~appmult.tb.stimulus`, :mod:`~appmult.tb.verilog`. In-simulator side
(cocotb test modules, loaded by dotted name; importing this package does not import
cocotb): :mod:`~appmult.tb.multiplier_tests`, :mod:`~appmult.tb.mac_tests`,
:mod:`~appmult.tb.mac_correction_tests` with :mod:`~appmult.tb.mac_drive`; both sides
meet in :mod:`~appmult.tb.protocol`.
"""

from .results import MacVerifyResult, Mismatch, VerifyResult
from .simulators import SIMULATORS, SimulationError, SimulatorNotFound, check_simulator, simulator_available
from .stimulus import EXHAUSTIVE_MAX_WIDTH, corner_codes
from .verify import run_mac, run_mac_correction, verify_mac, verify_multiplier

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
