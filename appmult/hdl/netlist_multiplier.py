"""A multiplier given as a stored gate list (a circuit file), elaborated gate by gate.

This is how a circuit found by :mod:`appmult.explore` (or written by any other tool)
becomes a first-class multiplier: ``from_spec("netlist:path=circuit.json")`` builds it,
and ``export``, ``cost``, ``characterize``, ``verify`` and ``retrain`` treat it like any
family member. Its LUT comes from synthesizing this component, as for every family.

Circuit file (JSON, UTF-8)::

    {"format": "appmult-circuit", "version": 1,
     "width_a": 8, "width_b": 8, "signed": false,
     "gates": [["and", 2, 10], ["xor", 18, 5], ["mux", 3, 4, 19], ...],
     "outputs": [18, 0, 19, ...],
     "metadata": {...}}

Nodes are numbered: ``0`` is constant 0, ``1`` constant 1, ``2 .. 2+width_a-1`` the bits
of ``a`` (LSB first), then the ``width_b`` bits of ``b``, then one node per gate in list
order. A gate reads only nodes numbered below its own (the list is in topological
order, so there are no loops). ``outputs`` has ``width_a + width_b`` node numbers, the
product bits LSB first. Gate operations (:data:`GATE_OPS`): ``buf x``, ``not x``,
``and``, ``or``, ``xor``, ``nand``, ``nor``, ``xnor`` (two inputs), ``andnot x y`` =
``x & ~y``, ``ornot x y`` = ``x | ~y``, ``mux x y s`` = ``s ? y : x``. ``metadata`` is
free-form and not part of the circuit's identity (:func:`circuit_digest`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from amaranth.hdl import Cat, Const, Module, Mux, Signal

from ..errors import InvalidTypeError, InvalidValueError, MissingFileError
from ._base import MAX_WIDTH, MIN_WIDTH, Multiplier, Param
from .registry import register_family

__all__ = ["CIRCUIT_FORMAT", "CIRCUIT_VERSION", "GATE_OPS", "NetlistMultiplier", "check_circuit",
           "circuit_digest", "load_circuit"]

CIRCUIT_FORMAT = "appmult-circuit"
CIRCUIT_VERSION = 1
#: Gate operation -> number of inputs.
GATE_OPS: dict[str, int] = {"buf": 1, "not": 1, "and": 2, "or": 2, "xor": 2, "nand": 2, "nor": 2, "xnor": 2,
                            "andnot": 2, "ornot": 2, "mux": 3}
#: Hex digits of the SHA-256 a spec carries (64 bits: collisions are not a concern).
DIGEST_CHARS = 16


def _fail(where: str, what: str) -> InvalidValueError:
    return InvalidValueError(f"Circuit {where}: {what}")


def check_circuit(data: Any, where: str = "data") -> dict[str, Any]:
    """Validate a circuit dictionary and return its canonical part.

    Args:
        data: the parsed circuit file.
        where: how to name the circuit in messages (a path).

    Returns:
        ``{"width_a", "width_b", "signed", "gates", "outputs"}`` with gates as lists.

    Raises:
        appmult.errors.InvalidValueError: wrong format marker or version, widths out of
            range, an unknown operation, a wrong number of inputs, a gate reading a node
            that is not below it, an output list of the wrong length or out of range.
    """
    if not isinstance(data, dict) or data.get("format") != CIRCUIT_FORMAT:
        raise _fail(where, f"not an appmult circuit (expected \"format\": \"{CIRCUIT_FORMAT}\")")
    if data.get("version") != CIRCUIT_VERSION:
        raise _fail(where, f"version {data.get('version')!r} is not supported (expected {CIRCUIT_VERSION})")
    widths = []
    for key in ("width_a", "width_b"):
        w = data.get(key)
        if not isinstance(w, int) or isinstance(w, bool) or not MIN_WIDTH <= w <= MAX_WIDTH:
            raise _fail(where, f"{key} must be an integer in {MIN_WIDTH}..{MAX_WIDTH}, not {w!r}")
        widths.append(w)
    signed = data.get("signed")
    if not isinstance(signed, bool):
        raise _fail(where, f"signed must be true or false, not {signed!r}")
    gates = data.get("gates")
    outputs = data.get("outputs")
    if not isinstance(gates, list) or not isinstance(outputs, list):
        raise _fail(where, "gates and outputs must be lists")
    first_gate = 2 + widths[0] + widths[1]
    canon_gates = []
    for k, gate in enumerate(gates):
        node = first_gate + k
        if not isinstance(gate, list) or not gate or gate[0] not in GATE_OPS:
            raise _fail(where, f"gate {k} (node {node}) must be [op, inputs...] with op one of "
                               f"{', '.join(GATE_OPS)}, not {gate!r}")
        op, ins = gate[0], gate[1:]
        if len(ins) != GATE_OPS[op]:
            raise _fail(where, f"gate {k} (node {node}): {op} takes {GATE_OPS[op]} inputs, not {len(ins)}")
        for x in ins:
            if not isinstance(x, int) or isinstance(x, bool) or not 0 <= x < node:
                raise _fail(where, f"gate {k} (node {node}) reads {x!r}; a gate reads nodes 0..{node - 1}")
        canon_gates.append([op, *ins])
    width_p = widths[0] + widths[1]
    n_nodes = first_gate + len(gates)
    if len(outputs) != width_p:
        raise _fail(where, f"outputs must list {width_p} nodes (width_a + width_b), not {len(outputs)}")
    for x in outputs:
        if not isinstance(x, int) or isinstance(x, bool) or not 0 <= x < n_nodes:
            raise _fail(where, f"output node {x!r} is not a node 0..{n_nodes - 1}")
    return {"width_a": widths[0], "width_b": widths[1], "signed": signed, "gates": canon_gates,
            "outputs": list(outputs)}


def circuit_digest(data: dict[str, Any]) -> str:
    """SHA-256 (hex) of a circuit's canonical part (widths, signedness, gates, outputs).

    Raises:
        appmult.errors.InvalidValueError: the circuit is malformed.
    """
    canon = check_circuit(data if "format" in data else {"format": CIRCUIT_FORMAT, "version": CIRCUIT_VERSION,
                                                          **data})
    return hashlib.sha256(json.dumps(canon, separators=(",", ":"), sort_keys=True).encode()).hexdigest()


def load_circuit(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a circuit file.

    Returns:
        The whole file as a dictionary (metadata included).

    Raises:
        appmult.errors.MissingFileError: no such file.
        appmult.errors.InvalidValueError: not JSON, or not a valid circuit.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"Circuit file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _fail(repr(str(path)), f"not JSON ({exc})") from None
    check_circuit(data, repr(str(path)))
    return data


def _gate_numpy(op: str, x: list[np.ndarray]) -> np.ndarray:
    if op == "buf":
        return x[0]
    if op == "not":
        return ~x[0]
    if op == "mux":
        return np.where(x[2], x[1], x[0])
    a, b = x
    return {"and": lambda: a & b, "or": lambda: a | b, "xor": lambda: a ^ b, "nand": lambda: ~(a & b),
            "nor": lambda: ~(a | b), "xnor": lambda: ~(a ^ b), "andnot": lambda: a & ~b,
            "ornot": lambda: a | ~b}[op]()


@register_family
class NetlistMultiplier(Multiplier):
    """A multiplier elaborated from a circuit file (see the module docstring).

    Widths and signedness are the file's; given ones must agree with it.

    Args:
        path: the circuit file (JSON).
        digest: the first 16 hex digits (or all) of :func:`circuit_digest`; when given,
            a file whose content no longer matches is refused. The canonical spec always
            carries it, so cached LUTs are keyed by the circuit's content, not its path.
        **kwargs: ``width``, ``width_a``, ``width_b``, ``signed``: checked against the file.

    Raises:
        TypeError: ``path`` or ``digest`` is not a string.
        appmult.errors.MissingFileError: no such file.
        appmult.errors.InvalidValueError: a malformed circuit, a digest or width that does
            not match the file.
    """

    family = "netlist"
    DESCRIPTION = ("a stored gate list (appmult explore writes them), widths and signedness from the file; "
                   "spec netlist:path=circuit.json")
    PARAMS = (
        Param("path", "str", None, "circuit file (JSON gate list) (required)"),
        Param("digest", "str", None, "expected content digest (hex prefix); the canonical spec has it"),
    )
    FILE_BACKED = True

    def __init__(self, *, path: str | os.PathLike | None = None, digest: str | None = None,
                 width: int | None = None, width_a: int | None = None, width_b: int | None = None,
                 signed: bool | None = None):
        self._MustUse__silence = True
        if not isinstance(path, (str, os.PathLike)):
            raise InvalidTypeError(f"Netlist path must be a file name, not {path!r}")
        if digest is not None and not isinstance(digest, str):
            raise InvalidTypeError(f"Netlist digest must be a hex string, not {digest!r}")
        data = load_circuit(path)
        canon = check_circuit(data, repr(str(path)))
        full = circuit_digest(data)
        if digest is not None and len(digest) < 8:
            raise InvalidValueError(f"Netlist digest {digest!r} is too short: give at least 8 hex digits of "
                                    f"{full[:DIGEST_CHARS]} (the circuit's digest)")
        if digest is not None and not full.startswith(digest.lower()):
            raise InvalidValueError(f"Circuit {str(path)!r} has digest {full[:DIGEST_CHARS]}, not {digest!r}: "
                                    "the file changed since the spec was written")
        given = {"width_a": width_a if width_a is not None else width,
                 "width_b": width_b if width_b is not None else width, "signed": signed}
        for key, value in given.items():
            if value is not None and value != canon[key]:
                raise InvalidValueError(f"Circuit {str(path)!r} has {key}={canon[key]!r}, not {value!r}")
        self._path = os.fspath(path)
        self._digest = full[:DIGEST_CHARS]
        self._gates = [tuple(g) for g in canon["gates"]]
        self._outputs = tuple(canon["outputs"])
        self._metadata = data.get("metadata", {})
        super().__init__(width_a=canon["width_a"], width_b=canon["width_b"], signed=canon["signed"])

    @property
    def path(self) -> str:
        """The circuit file, as given."""
        return self._path

    @property
    def digest(self) -> str:
        """The first 16 hex digits of the circuit's content digest."""
        return self._digest

    @property
    def gates(self) -> list[tuple]:
        """The gate list, ``(op, input nodes...)`` each."""
        return list(self._gates)

    @property
    def outputs(self) -> tuple[int, ...]:
        """Node of each product bit, LSB first."""
        return self._outputs

    @property
    def metadata(self) -> dict[str, Any]:
        """The file's free-form ``metadata`` (how the circuit was found, its figures then)."""
        return dict(self._metadata)

    def elaborate(self, platform):
        m = Module()
        a = self.a.as_unsigned()
        b = self.b.as_unsigned()
        nodes = [Const(0, 1), Const(1, 1), *(a[i] for i in range(self.width_a)),
                 *(b[j] for j in range(self.width_b))]
        for k, (op, *ins) in enumerate(self._gates):
            x = [nodes[i] for i in ins]
            if op == "buf":
                expr = x[0]
            elif op == "not":
                expr = ~x[0]
            elif op == "mux":
                expr = Mux(x[2], x[1], x[0])
            else:
                expr = {"and": lambda: x[0] & x[1], "or": lambda: x[0] | x[1], "xor": lambda: x[0] ^ x[1],
                        "nand": lambda: ~(x[0] & x[1]), "nor": lambda: ~(x[0] | x[1]),
                        "xnor": lambda: ~(x[0] ^ x[1]), "andnot": lambda: x[0] & ~x[1],
                        "ornot": lambda: x[0] | ~x[1]}[op]()
            # One named wire per gate keeps the exported Verilog readable and shared.
            wire = Signal(name=f"g{k}")
            m.d.comb += wire.eq(expr)
            nodes.append(wire)
        m.d.comb += self.p.eq(Cat(*(nodes[i] for i in self._outputs)))
        return m

    def _model(self, a_codes, b_codes):
        shape = a_codes.shape
        nodes = [np.zeros(shape, dtype=bool), np.ones(shape, dtype=bool)]
        nodes += [((a_codes >> i) & 1).astype(bool) for i in range(self.width_a)]
        nodes += [((b_codes >> j) & 1).astype(bool) for j in range(self.width_b)]
        for op, *ins in self._gates:
            nodes.append(_gate_numpy(op, [nodes[i] for i in ins]))
        value = np.zeros(shape, dtype=np.int64)
        for k, node in enumerate(self._outputs):
            value |= nodes[node].astype(np.int64) << k
        return value
