"""Checks on a gate netlist read from a user's file: port roles, drivers, sequential elements.

A wrong netlist must never become a wrong LUT without an error: ports are taken by name
or inferred (two input buses and one output bus, in declaration order), every product
bit and gate input must have a driver, and nothing sequential may hide in the design
(checked on a dump taken before synthesis, which would otherwise fold such things into
constants).
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import UserError
from .bitparallel import GATE_TYPES

__all__ = ["MAX_OUTPUT_WIDTH", "NetlistError", "check_declared_signedness", "check_driven", "check_source_design",
           "inference_note", "is_sequential", "read_cells", "read_port_bits", "resolve_ports", "undefined_inputs",
           "x_reaching_message"]

#: Widest product a netlist may have (the evaluator packs products into int64).
MAX_OUTPUT_WIDTH = 62


_SEQUENTIAL_HINTS = ("DFF", "DLATCH", "SR_", "$ff", "$dff", "$adff", "$sdff", "$aldff", "$dlatch",
                     "$sr", "$mem", "$fsm", "$_FF_")
#: Longest list of net names or bits an error message spells out.
_LIST_MAX = 16


class NetlistError(UserError, ValueError):
    """A netlist that cannot be a multiplier (wrong ports, sequential cells, undriven nets, ...)."""


def net(bit: Any) -> Any:
    # Yosys writes driven bits as integers and constants as "0", "1", "x", "z";
    # undefined constants evaluate as 0.
    if isinstance(bit, int):
        return bit
    return "1" if bit == "1" else "0"


def undriven_output_message(top: str, name: str, bits: list[int]) -> str:
    return (f"Output {name!r} of module {top!r} is not driven at bits {list_items(bits)}: an undriven output "
            "has no defined value; assign every bit (a constant 0 or 1 where intended)")


def list_items(items: list[Any]) -> str:
    shown = ", ".join(str(i) for i in items[:_LIST_MAX])
    return shown if len(items) <= _LIST_MAX else f"{shown}, ... ({len(items)} in all)"


def bit_names(module: dict[str, Any], bits: list[Any]) -> list[str]:
    """User-visible names of nets (``t[1]``), preferring names the user wrote."""
    names: dict[Any, str] = {}
    ranked = sorted(module.get("netnames", {}).items(), key=lambda kv: (kv[0].startswith("$"), kv[0]))
    for name, net in ranked:
        width = len(net["bits"])
        for k, bit in enumerate(net["bits"]):
            names.setdefault(bit, f"{name}[{k}]" if width > 1 else name)
    return [names.get(bit, str(bit)) for bit in bits]


def resolve_ports(top: str, port_table: dict[str, Any],
                   given: tuple[str | None, ...]) -> tuple[tuple[str, str, str], list[str]]:
    """Names of the a, b, p ports, and the roles whose names were inferred.

    A port called ``a``, ``b`` or ``p`` takes that role (before any other is placed: an input
    called ``b`` declared first is still operand b); the roles left take the remaining
    inputs and output in declaration order, and only those count as inferred.
    """
    for name, direction in zip(given, ("input", "input", "output")):
        if name is None:
            continue
        if name not in port_table:
            raise NetlistError(f"Module {top!r} has no port {name!r} "
                               f"(ports: {', '.join(sorted(port_table)) or 'none'})")
        if port_table[name]["direction"] != direction:
            raise NetlistError(f"Port {name!r} of module {top!r} is an {port_table[name]['direction']}, "
                               f"expected an {direction}")
    if None not in given:
        return given, []  # type: ignore[return-value]
    if given == (None, None, None) and all(n in port_table for n in ("a", "b", "p")):
        return ("a", "b", "p"), []
    inputs = [n for n, port in port_table.items() if port["direction"] == "input"]
    outputs = [n for n, port in port_table.items() if port["direction"] == "output"]
    if (None in given[:2] and len(inputs) != 2) or (given[2] is None and len(outputs) != 1):
        raise NetlistError(f"Cannot tell which ports of module {top!r} are the operands a, b and the product p: "
                           f"inputs {', '.join(inputs) or 'none'}; outputs {', '.join(outputs) or 'none'}. "
                           "Name them with a=, b= and p=")
    # Yosys lists ports in declaration order; a port literally named after its role wins.
    free = {"input": [n for n in inputs if n not in given], "output": [n for n in outputs if n not in given]}
    names = list(given)
    slots = (("a", "input"), ("b", "input"), ("p", "output"))
    for k, (role, direction) in enumerate(slots):  # first the named ones: an input called b
        if names[k] is None and role in free[direction]:  # declared first is still operand b
            names[k] = role
            free[direction].remove(role)
    roles = []  # (the roles taken by position: what the note reports as inferred)
    for k, (role, direction) in enumerate(slots):
        if names[k] is None:
            names[k] = free[direction].pop(0)
            roles.append(role)
    return (names[0], names[1], names[2]), roles


def check_declared_signedness(module: dict[str, Any], top: str, ports: tuple[str, str, str], signed: bool) -> None:
    """Refuse to read operands the module declares ``signed`` as unsigned.

    (The other way round is allowed: many signed multipliers, EvoApprox's among them, declare
    plain ports and mean two's complement.)
    """
    netnames = module.get("netnames", {})
    declared = [name for name in ports[:2] if netnames.get(name, {}).get("signed")]
    if declared and not signed:
        raise NetlistError(f"Module {top!r} declares operand port{'s' if len(declared) > 1 else ''} "
                           f"{' and '.join(map(repr, declared))} signed, but the multiplier is read as unsigned: "
                           "pass signed=True (--signed), or drop the signed keyword if the operands are unsigned")


def inference_note(top: str, ports: tuple[str, str, str], roles: list[str], bits: dict[str, list[Any]],
                    widths: list[str]) -> str | None:
    if roles:
        what = {"a": "operand a", "b": "operand b", "p": "product p"}
        parts = [f"{what[r]} = {ports['abp'.index(r)]!r} ({len(bits[r])} bits)" for r in roles]
        taken = ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]
        return f"Module {top!r}: took {taken} from its two inputs and one output in declaration order"
    if widths:
        values = " and ".join(f"width_{r} = {len(bits[r])}" for r in widths)
        names = " and ".join(repr(ports["abp".index(r)]) for r in widths)
        return f"Module {top!r}: took {values} from port{'s' if len(widths) > 1 else ''} {names}"
    return None


def is_sequential(cell_type: str) -> bool:
    return any(h in cell_type for h in _SEQUENTIAL_HINTS) or "latch" in cell_type.lower()


def check_source_design(checks_json: str, top: str, product: str) -> None:
    """Refuse what synthesis hides: sequential elements and nets that nothing drives.

    ``checks_json`` is the design after ``proc`` and ``flatten`` only (see
    :func:`synthesis_script`): a flip-flop clocked by an undriven net is still there,
    an undriven wire is still read by the cells that use it, and an output bit assigned
    ``x`` or ``z`` is still visible as such.
    """
    module = json.loads(checks_json)["modules"][top]
    sequential: dict[str, int] = {}
    driven: set[Any] = set()
    reads: list[Any] = []
    for port in module.get("ports", {}).values():
        if port["direction"] in ("input", "inout"):
            driven.update(port["bits"])
        if port["direction"] in ("output", "inout"):
            reads.extend(port["bits"])
    for cell in module.get("cells", {}).values():
        ctype = cell["type"]
        if is_sequential(ctype):
            sequential[ctype] = sequential.get(ctype, 0) + 1
        directions = cell.get("port_directions", {})
        for port, bits in cell.get("connections", {}).items():
            direction = directions.get(port, "inout")  # unknown: count as both
            if direction in ("output", "inout"):
                driven.update(bits)
            if direction in ("input", "inout"):
                reads.extend(bits)
    if sequential:
        listing = ", ".join(f"{t} ({n})" for t, n in sorted(sequential.items()))
        raise NetlistError(f"Module {top!r} is not combinational: it contains sequential cells "
                           f"{listing}; the circuit must be combinational")
    product_bits = module["ports"][product]["bits"]
    loose = [k for k, bit in enumerate(product_bits)
             if (bit not in driven if isinstance(bit, int) else bit not in ("0", "1"))]
    if loose:
        raise NetlistError(undriven_output_message(top, product, loose))
    high_z = undefined_inputs(module, "z")
    if high_z:
        raise NetlistError(f"Module {top!r} feeds z (high impedance) into its logic ({', '.join(high_z)}): a "
                           "multiplier's product must be 0 or 1 on every bit for every input. Write 0 or 1 instead")
    floating = sorted({bit for bit in reads if isinstance(bit, int) and bit not in driven})
    if floating:
        raise NetlistError(f"Module {top!r} reads nets that nothing drives: "
                           f"{list_items(bit_names(module, floating))}; an undriven net has no defined value "
                           "(synthesis would fold it away as \"don't care\"): drive it or remove it")


def undefined_inputs(module: dict[str, Any], value: str) -> list[str]:
    """Types of the cells of a Yosys JSON module that read the constant ``value`` (``"x"`` or ``"z"``)."""
    return sorted({cell["type"] for cell in module.get("cells", {}).values()
                   for port, bits in cell.get("connections", {}).items()
                   if cell.get("port_directions", {}).get(port, "inout") != "output" and value in bits})


def x_reaching_message(top: str, cells: list[str], why: str) -> str:
    return (f"Module {top!r} feeds x (don't-care) constants into its logic ({', '.join(cells)}) {why}: there the "
            "Verilog has no defined product and synthesis would pick one. Write 0 or 1 instead")


def read_cells(module: dict[str, Any], top: str) -> tuple[list[tuple[str, dict[str, Any]]], list[Any], set[Any]]:
    """The gates of a Yosys JSON module: ``(cells, bits read by gates, bits driven by gates)``.

    Raises:
        NetlistError: a sequential or otherwise unsupported cell type.
    """
    # Cell types first: a sequential circuit also has extra ports (clock), and
    # "not combinational" is the message that explains the problem.
    cells: list[tuple[str, dict[str, Any]]] = []
    unsupported: dict[str, int] = {}
    gate_reads: list[Any] = []  # raw Yosys bits, before constants are mapped
    gate_drives: set[Any] = set()
    for cell in module.get("cells", {}).values():
        ctype = cell["type"]
        if ctype not in GATE_TYPES:
            unsupported[ctype] = unsupported.get(ctype, 0) + 1
            continue
        cells.append((ctype, {port: net(bits[0]) for port, bits in cell["connections"].items()}))
        for port, bits in cell["connections"].items():
            if port == "Y":
                gate_drives.update(bits)
            else:
                gate_reads.extend(bits)
    if unsupported:
        listing = ", ".join(f"{t} ({n})" for t, n in sorted(unsupported.items()))
        if any(is_sequential(t) for t in unsupported):
            raise NetlistError(f"Module {top!r} is not combinational: it contains sequential cells "
                               f"{listing}; the circuit must be combinational")
        raise NetlistError(f"Module {top!r} contains unsupported cell types {listing}; "
                           f"supported: {', '.join(sorted(GATE_TYPES))}")
    return cells, gate_reads, gate_drives


def read_port_bits(top: str, port_table: dict[str, Any], ports: tuple[str, str, str],
                   widths: tuple[int | None, int | None, int | None]) -> dict[str, list[Any]]:
    """The nets of the operand and product ports, checked for direction and width.

    Raises:
        NetlistError: a missing port, a wrong direction or width, an extra input, or a
            product wider than :data:`MAX_OUTPUT_WIDTH`.
    """
    out: dict[str, list[Any]] = {}
    for role, name, direction, want in (("a", ports[0], "input", widths[0]),
                                        ("b", ports[1], "input", widths[1]),
                                        ("p", ports[2], "output", widths[2])):
        if name not in port_table:
            raise NetlistError(f"Module {top!r} has no port {name!r} (ports: {', '.join(sorted(port_table)) or 'none'})")
        port = port_table[name]
        if port["direction"] != direction:
            raise NetlistError(f"Port {name!r} of module {top!r} is an {port['direction']}, expected an {direction}")
        bits = [net(b) for b in port["bits"]]
        if want is not None and len(bits) != want:
            what = {"a": "width_a", "b": "width_b", "p": "width_p"}[role]
            raise NetlistError(f"Port {name!r} of module {top!r} is {len(bits)} bits wide, expected {what}={want}")
        out[role] = bits
    extra = sorted(n for n, p in port_table.items() if p["direction"] != "output" and n not in ports[:2])
    if extra:
        raise NetlistError(f"Module {top!r} has inputs besides {ports[0]!r} and {ports[1]!r}: "
                           f"{', '.join(extra)}; a multiplier netlist has exactly two operands")
    if not 1 <= len(out["p"]) <= MAX_OUTPUT_WIDTH:
        raise NetlistError(f"Port {ports[2]!r} is {len(out['p'])} bits wide; 1..{MAX_OUTPUT_WIDTH} supported")
    return out


def check_driven(module: dict[str, Any], top: str, ports: tuple[str, str, str], bits: dict[str, list[Any]],
                 gate_reads: list[Any], gate_drives: set[Any]) -> None:
    """Refuse product bits and gate inputs that nothing drives.

    A net without a driver would evaluate as 0: a wrong table without an error. (The
    constants "x"/"z" of a hand-written netlist do read as 0; user files are checked for
    them before synthesis, see :func:`check_source_design`.)

    Raises:
        NetlistError: an undriven product bit or gate input.
    """
    driven = {bit for bit in bits["a"] + bits["b"] if isinstance(bit, int)} | gate_drives
    port_bits = module.get("ports", {})[ports[2]]["bits"]
    loose = [k for k, bit in enumerate(port_bits) if isinstance(bit, int) and bit not in driven]
    if loose:
        raise NetlistError(undriven_output_message(top, ports[2], loose))
    floating = sorted({bit for bit in gate_reads if isinstance(bit, int) and bit not in driven})
    if floating:
        raise NetlistError(f"Module {top!r} has gates reading nets that nothing drives: "
                           f"{list_items(bit_names(module, floating))}; an undriven net has no defined value")
