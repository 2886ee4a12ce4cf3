"""Product LUTs, error metrics, gradient LUTs and the LUT file format.

Never imports torch. The LUT file module (:mod:`appmult.lut_gen.lutfile`) depends on
numpy only; characterization (which needs Amaranth and Yosys) is imported lazily.
"""

from .lutfile import FORMAT_VERSION, LutFile, LutFileError, load

__all__ = ["FORMAT_VERSION", "LutFile", "LutFileError", "load"]
