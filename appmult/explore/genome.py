"""The search's circuit representation: a feed-forward list of 3-input truth-table gates.

A :class:`Genome` is what Cartesian Genetic Programming calls a chromosome with one row
and unlimited levels-back: gate ``g`` (node ``n_in + g``) has a truth table ``tt[g]``
over its inputs ``src[g] = (x0, x1, x2)``, each a node below its own; ``out[k]`` is the
node of product bit ``k``. Nodes: 0 constant 0, 1 constant 1, ``2 ..`` the bits of
``a`` then ``b`` (LSB first), then the gates. Gates that no product bit reaches are
inactive and cost nothing (neutral genetic material).

Seeds come from synthesized gate netlists (:func:`genome_from_netlist`) or stored
circuit files (:func:`genome_from_circuit`); results are written as simplified circuit
files (:meth:`Genome.to_circuit`) that :class:`appmult.hdl.NetlistMultiplier` elaborates.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InvalidValueError
from ..hdl import CIRCUIT_FORMAT, CIRCUIT_VERSION, check_circuit, from_spec, load_circuit
from ..sim import Netlist, synthesize
from ..sim.bitparallel import GATE_TYPES
from . import _kernels as K


__all__ = ["Genome", "genome_from_circuit", "genome_from_netlist", "seed_genome"]

# Truth tables (x0 = A, x1 = B, x2 = S) of Yosys' gate cells and of the circuit file's ops.
_YOSYS_TT = {"$_BUF_": 0xAA, "$_NOT_": 0x55, "$_AND_": 0x88, "$_OR_": 0xEE, "$_XOR_": 0x66, "$_NAND_": 0x77,
             "$_NOR_": 0x11, "$_XNOR_": 0x99, "$_ANDNOT_": 0x22, "$_ORNOT_": 0xBB, "$_MUX_": K.MUX_TT}
_OP_TT = {"buf": 0xAA, "not": 0x55, "and": 0x88, "or": 0xEE, "xor": 0x66, "nand": 0x77, "nor": 0x11,
          "xnor": 0x99, "andnot": 0x22, "ornot": 0xBB, "mux": K.MUX_TT}
# Two-input truth tables (i = a + 2 b) -> (op, swap inputs).
_OP_OF_T4 = {1: ("nor", False), 2: ("andnot", False), 4: ("andnot", True), 7: ("nand", False),
             8: ("and", False), 11: ("ornot", False), 13: ("ornot", True), 14: ("or", False),
             6: ("xor", False), 9: ("xnor", False)}


class Genome:
    """A candidate circuit (see the module docstring).

    Args:
        width_a: width of operand ``a``.
        width_b: width of operand ``b``.
        signed: two's complement operands and product.
        tt: ``uint8`` truth table per gate.
        src: ``int32`` ``(n_gates, 3)`` input nodes per gate (unused inputs: node 0).
        out: ``int32`` node per product bit.
    """

    __slots__ = ("width_a", "width_b", "signed", "tt", "src", "out")

    def __init__(self, width_a: int, width_b: int, signed: bool, tt, src, out):
        self.width_a = int(width_a)
        self.width_b = int(width_b)
        self.signed = bool(signed)
        self.tt = np.ascontiguousarray(tt, dtype=np.uint8)
        self.src = np.ascontiguousarray(src, dtype=np.int32).reshape(-1, 3)
        self.out = np.ascontiguousarray(out, dtype=np.int32)
        if self.src.shape[0] != self.tt.shape[0] or self.out.shape != (self.width_p,):
            raise InvalidValueError("Genome arrays do not match: tt, src and out disagree in length")
        limit = self.n_in + np.arange(self.n_gates)
        if self.n_gates and ((self.src < 0).any() or (self.src >= limit[:, None]).any()):
            raise InvalidValueError("A gate reads a node that is not below it")
        if ((self.out < 0) | (self.out >= self.n_nodes)).any():
            raise InvalidValueError("A product bit names a node that does not exist")

    @property
    def width_p(self) -> int:
        return self.width_a + self.width_b

    @property
    def n_in(self) -> int:
        """Nodes before the first gate: two constants and the operand bits."""
        return 2 + self.width_a + self.width_b

    @property
    def n_gates(self) -> int:
        return int(self.tt.shape[0])

    @property
    def n_nodes(self) -> int:
        return self.n_in + self.n_gates

    def copy(self) -> Genome:
        twin = object.__new__(Genome)  # already validated: skip the checks (hot path of the search)
        twin.width_a, twin.width_b, twin.signed = self.width_a, self.width_b, self.signed
        twin.tt, twin.src, twin.out = self.tt.copy(), self.src.copy(), self.out.copy()
        return twin

    def same_as(self, other: Genome) -> bool:
        return (np.array_equal(self.tt, other.tt) and np.array_equal(self.src, other.src)
                and np.array_equal(self.out, other.out))

    # -- persistence ------------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        """JSON-ready form (checkpoints)."""
        return {"width_a": self.width_a, "width_b": self.width_b, "signed": self.signed,
                "tt": self.tt.tolist(), "src": self.src.tolist(), "out": self.out.tolist()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Genome:
        return cls(state["width_a"], state["width_b"], state["signed"], state["tt"],
                   np.asarray(state["src"], dtype=np.int32).reshape(-1, 3), state["out"])

    # -- analysis -----------------------------------------------------------------------------
    def _simplified(self):
        n = self.n_nodes
        rep = np.zeros(n, np.int32)
        inv = np.zeros(n, np.int32)
        stt = np.zeros(n, np.int32)
        ssrc = np.zeros((n, 3), np.int32)
        sdep = np.zeros(n, np.int32)
        used = np.zeros(n, np.int32)
        level = np.zeros(n, np.int32)
        figures = np.zeros(4, np.int64)
        K.circuit_cost(self.tt, self.src, self.out, self.n_in, rep, inv, stt, ssrc, sdep, used, level, figures)
        return rep, inv, stt, ssrc, sdep, used, figures

    def cost(self) -> dict[str, int]:
        """The search's cost estimate of the simplified circuit (see :func:`_kernels.circuit_cost`)."""
        figures = self._simplified()[-1]
        return {name: int(v) for name, v in zip(K.COST_FIGURES, figures)}

    def to_circuit(self, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """The simplified circuit as a circuit-file dictionary (constants folded, aliases
        removed, inactive gates dropped, inversions absorbed into the gates reading them).

        Args:
            metadata: stored under ``"metadata"``.
        """
        rep, inv, stt, ssrc, sdep, used, _ = self._simplified()
        n_in = self.n_in
        gates: list[list] = []
        new: dict[int, int] = {x: x for x in range(n_in)}
        nots: dict[int, int] = {}

        def add(op: str, *ins: int) -> int:
            gates.append([op, *ins])
            return n_in + len(gates) - 1

        def negate(x: int) -> int:
            if x <= 1:
                return 1 - x
            if x not in nots:
                nots[x] = add("not", x)
            return nots[x]

        def fn2(t4: int, a: int, b: int) -> int:
            if t4 in (0, 15):
                return 1 if t4 == 15 else 0
            if t4 in (10, 5):
                return a if t4 == 10 else negate(a)
            if t4 in (12, 3):
                return b if t4 == 12 else negate(b)
            op, swap = _OP_OF_T4[t4]
            return add(op, b, a) if swap else add(op, a, b)

        for node in range(n_in, self.n_nodes):
            if not used[node]:
                continue
            dep = int(sdep[node])
            t = int(stt[node])
            s = [new[int(x)] if x >= n_in else int(x) for x in ssrc[node]]
            if dep == 7:
                if t == K.MUX_TT:
                    new[node] = add("mux", s[0], s[1], s[2])
                else:  # Shannon expansion on x2
                    lo = fn2(t & 0xF, s[0], s[1])
                    hi = fn2(t >> 4, s[0], s[1])
                    new[node] = add("mux", lo, hi, s[2])
                continue
            j, k = [q for q in range(3) if (dep >> q) & 1]
            t4 = 0
            for i in range(4):
                x = ((i & 1) << j) | (((i >> 1) & 1) << k)
                t4 |= ((t >> x) & 1) << i
            new[node] = fn2(t4, s[j], s[k])
        outputs = []
        for o in self.out:
            r, v = int(rep[o]), int(inv[o])
            if r == 0:
                outputs.append(v)
                continue
            x = new[r] if r >= n_in else r
            outputs.append(negate(x) if v else x)
        circuit = {"format": CIRCUIT_FORMAT, "version": CIRCUIT_VERSION, "width_a": self.width_a,
                   "width_b": self.width_b, "signed": self.signed, "gates": gates, "outputs": outputs}
        check_circuit(circuit)
        if metadata is not None:
            circuit["metadata"] = metadata
        return circuit


def genome_from_circuit(data: dict[str, Any]) -> Genome:
    """A genome of a circuit-file dictionary (see :mod:`appmult.hdl.netlist_multiplier`).

    Raises:
        appmult.errors.InvalidValueError: a malformed circuit.
    """
    canon = check_circuit(data)
    tt, src = [], []
    for op, *ins in canon["gates"]:
        tt.append(_OP_TT[op])
        src.append((list(ins) + [0, 0, 0])[:3])
    return Genome(canon["width_a"], canon["width_b"], canon["signed"], np.array(tt, np.uint8),
                  np.array(src, np.int32).reshape(-1, 3), canon["outputs"])


def genome_from_netlist(netlist) -> Genome:
    """A genome of a synthesized gate netlist (:class:`appmult.sim.Netlist`).

    Only the gates that reach the product are kept, in topological order; buffers
    become aliases.

    Raises:
        appmult.errors.InvalidValueError: a product port not ``width_a + width_b`` bits wide.
    """
    bits = netlist.port_bits
    wa, wb = netlist.width_a, netlist.width_b
    if netlist.width_p != wa + wb:
        a, b, p = netlist.ports
        raise InvalidValueError(f"Module {netlist.top!r} has a {netlist.width_p}-bit product port {p!r}; a "
                                f"{wa}x{wb} multiplier ({a!r} x {b!r}) has {wa + wb} product bits")
    node: dict[Any, int] = {"0": 0, "1": 1}
    for i, net in enumerate(bits["a"]):
        node.setdefault(net, 2 + i)
    for j, net in enumerate(bits["b"]):
        node.setdefault(net, 2 + wa + j)
    driver = {conn["Y"]: (ctype, conn) for ctype, conn in netlist.cells}
    tt: list[int] = []
    src: list[list[int]] = []
    n_in = 2 + wa + wb
    for root in bits["p"]:
        stack = [root]
        while stack:
            net = stack[-1]
            if net in node:
                stack.pop()
                continue
            ctype, conn = driver[net]
            ins = [conn[p] for p in GATE_TYPES[ctype]]
            pending = [x for x in ins if x not in node]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            if ctype == "$_BUF_":
                node[net] = node[ins[0]]
                continue
            tt.append(_YOSYS_TT[ctype])
            src.append(([node[x] for x in ins] + [0, 0, 0])[:3])
            node[net] = n_in + len(tt) - 1
    return Genome(wa, wb, netlist.signed, np.array(tt, np.uint8), np.array(src, np.int32).reshape(-1, 3),
                  [node[x] for x in bits["p"]])


def seed_genome(source: str, *, signed: bool | None = None) -> tuple[Genome, str]:
    """The seed of a search, and how to name it.

    Args:
        source: a multiplier spec (``exact:width=8``), a circuit file (``.json``), or a
            user's Verilog file (``.v``/``.sv``; ports inferred as
            :meth:`appmult.sim.Netlist.from_verilog` does).
        signed: signedness of a Verilog seed (required for one); for a spec or a circuit
            file, which say it themselves, it must agree with them.

    Raises:
        appmult.errors.SpecError: a malformed spec.
        appmult.errors.InvalidValueError: a Verilog seed without ``signed``, or a ``signed``
            that contradicts the seed's own.
    """
    from pathlib import Path

    text = str(source)
    suffix = Path(text).suffix.lower()
    if suffix in (".v", ".sv"):
        if signed is None:
            raise InvalidValueError(f"Say whether the Verilog seed {text!r} is signed (--signed or --unsigned)")
        netlist = Netlist.from_verilog(text, signed=signed)
        return genome_from_netlist(netlist), f"{text} ({netlist.inferred})" if netlist.inferred else text
    if suffix == ".json":
        genome, name = genome_from_circuit(load_circuit(text)), text
    else:
        mult = from_spec(text)
        genome, name = genome_from_netlist(synthesize(mult)), mult.spec
    if signed is not None and signed != genome.signed:
        own, asked = ("signed", "unsigned") if genome.signed else ("unsigned", "signed")
        article = "an" if asked == "unsigned" else "a"
        how = (f"start from {article} {asked} circuit file" if suffix == ".json"
               else f"write signed={str(signed).lower()} in the spec")
        raise InvalidValueError(f"The seed {text!r} is {own} ({name}); for {article} {asked} search {how}, or "
                                f"drop --{asked}")
    return genome, name
