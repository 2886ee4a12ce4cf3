"""appmult: approximate multipliers from Amaranth HDL to retrained networks.

Subpackages (imported on demand, so that ``import appmult.nn`` never pulls in
Amaranth or Yosys, and ``import appmult.hdl`` never pulls in torch):

* :mod:`appmult.hdl` -- multiplier families as Amaranth components, Verilog export.
* :mod:`appmult.sim` -- Yosys gate netlists and the bit-parallel exhaustive evaluator.
* :mod:`appmult.lut_gen` -- product/gradient LUTs, metrics, LUT files.
* :mod:`appmult.nn` -- PyTorch layers that reproduce a LUT exactly.
* :mod:`appmult.tb` -- cocotb verification of the exported RTL.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
