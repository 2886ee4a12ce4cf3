"""Bit-parallel evaluation of a gate netlist: 64 test vectors per ``uint64`` word per gate.

A netlist is compiled once into a generated Python function that calls one numpy
ufunc (with ``out=``) per gate, in topological order. Wires live in a small pool of
preallocated word buffers: a buffer is handed to a gate's output and returned to the
pool after the wire's last reader, so memory is bounded by the netlist's widest cut,
not by its gate count, and no array is allocated inside the loop.

Vector ``v`` sits in bit ``v % 64`` of word ``v // 64``. For exhaustive runs the
vector index is ``v = a_code * 2**width_b + b_code``, so input bit ``k`` of the
combined index (``b`` bits first, then ``a`` bits) is a fixed pattern inside a word for
``k < 6``, a fixed pattern inside an aligned chunk of ``2**m`` words for ``k < 6 + m``,
and a constant (all zeros or all ones) over the chunk beyond that. Those inputs are
built once per chunk size and reused by every chunk.

Output words become integers with an 8x8 bit-matrix transpose (three delta swaps on
``uint64``): eight output bits of eight vectors sit in one word as eight bytes, and
after the transpose each byte holds the eight output bits of one vector.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from ..errors import InvalidValueError

__all__ = ["GATE_TYPES", "BitParallelEvaluator", "words_to_values"]

# Input port names of each supported Yosys internal gate cell (output is always Y).
GATE_TYPES: dict[str, tuple[str, ...]] = {
    "$_BUF_": ("A",),
    "$_NOT_": ("A",),
    "$_AND_": ("A", "B"),
    "$_OR_": ("A", "B"),
    "$_XOR_": ("A", "B"),
    "$_NAND_": ("A", "B"),
    "$_NOR_": ("A", "B"),
    "$_XNOR_": ("A", "B"),
    "$_ANDNOT_": ("A", "B"),  # A & ~B
    "$_ORNOT_": ("A", "B"),   # A | ~B
    "$_MUX_": ("A", "B", "S"),  # S ? B : A
}

# Code templates; {y} is never one of the operands (the allocator guarantees it), so
# multi-step gates may use it as scratch.
_TEMPLATES: dict[str, str] = {
    "$_NOT_": "_not({A}, out={y})",
    "$_AND_": "_and({A}, {B}, out={y})",
    "$_OR_": "_or({A}, {B}, out={y})",
    "$_XOR_": "_xor({A}, {B}, out={y})",
    "$_NAND_": "_and({A}, {B}, out={y}); _not({y}, out={y})",
    "$_NOR_": "_or({A}, {B}, out={y}); _not({y}, out={y})",
    "$_XNOR_": "_xor({A}, {B}, out={y}); _not({y}, out={y})",
    "$_ANDNOT_": "_not({B}, out={y}); _and({A}, {y}, out={y})",
    "$_ORNOT_": "_not({B}, out={y}); _or({A}, {y}, out={y})",
    "$_MUX_": "_xor({A}, {B}, out={y}); _and({y}, {S}, out={y}); _xor({y}, {A}, out={y})",
}

_ALL_ONES = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
# Bit k of the vector index v = 0..63, as one word per k.
_LOW_PATTERNS = [sum(1 << v for v in range(64) if (v >> k) & 1) for k in range(6)]

Net = int | str  # a Yosys bit id, or a constant "0"/"1"


def words_to_values(words: np.ndarray, signed: bool) -> np.ndarray:
    """Turn bit-sliced output words into one integer per vector.

    Args:
        words: ``uint64`` array of shape ``(width_p, n_words)``; bit ``v % 64`` of
            ``words[k, v // 64]`` is output bit ``k`` of vector ``v``. ``width_p <= 63``.
        signed: interpret the ``width_p``-bit results as two's complement.

    Returns:
        int64 array of ``64 * n_words`` values, in vector order.
    """
    width_p, n = words.shape
    out = np.zeros((n * 64, 8), dtype=np.uint8)
    for g in range((width_p + 7) // 8):
        rows = words[8 * g: 8 * g + 8]
        if rows.shape[0] < 8:
            rows = np.concatenate([rows, np.zeros((8 - rows.shape[0], n), dtype=np.uint64)])
        # x[e]: byte k = byte (e % 8) of word (e // 8) of output bit 8g+k.
        x = np.ascontiguousarray(rows.view(np.uint8).reshape(8, n * 8).T).view(np.uint64).reshape(-1)
        t = np.empty_like(x)
        for shift, mask in ((7, 0x00AA00AA00AA00AA), (14, 0x0000CCCC0000CCCC), (28, 0x00000000F0F0F0F0)):
            s, m = np.uint64(shift), np.uint64(mask)
            np.right_shift(x, s, out=t)
            np.bitwise_xor(t, x, out=t)
            np.bitwise_and(t, m, out=t)
            np.bitwise_xor(x, t, out=x)
            np.left_shift(t, s, out=t)
            np.bitwise_xor(x, t, out=x)
        out[:, g] = x.view(np.uint8)
    values = out.view(np.int64).reshape(-1)
    if signed and width_p:
        sign = np.int64(1 << (width_p - 1))
        values ^= sign
        values -= sign
    return values


class BitParallelEvaluator:
    """A combinational gate netlist compiled to a bit-parallel numpy function.

    Args:
        inputs: nets of the input bits, in combined-index order (for a multiplier:
            ``b`` bits LSB first, then ``a`` bits).
        outputs: nets of the output bits, LSB first.
        cells: ``(type, {port: net})`` for each gate; types from :data:`GATE_TYPES`;
            a constant net is ``"0"`` or ``"1"``.

    Raises:
        ValueError: unsupported cell type, a net driven twice, or a combinational loop.
    """

    def __init__(self, inputs: Sequence[Net], outputs: Sequence[Net],
                 cells: Sequence[tuple[str, dict[str, Net]]]):
        self.n_inputs = len(inputs)
        self.n_outputs = len(outputs)
        self._source, self.n_registers, self.n_gates = _generate(list(inputs), list(outputs), list(cells))
        namespace: dict = {}
        exec(compile(self._source, "<appmult bit-parallel netlist>", "exec"), namespace)
        self._kernel = namespace["kernel"]
        self._pools: dict[int, tuple[list[np.ndarray], np.ndarray, np.ndarray]] = {}

    @property
    def source(self) -> str:
        """The generated Python source (for inspection and debugging)."""
        return self._source

    def _pool(self, n_words: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        pool = self._pools.get(n_words)
        if pool is None:
            regs = [np.empty(n_words, dtype=np.uint64) for _ in range(self.n_registers)]
            pool = (regs, np.zeros(n_words, dtype=np.uint64), np.full(n_words, _ALL_ONES, dtype=np.uint64))
            # Keep a couple of sizes (exhaustive chunk, tail chunk); drop older ones.
            if len(self._pools) >= 4:
                self._pools.pop(next(iter(self._pools)))
            self._pools[n_words] = pool
        return pool

    def run_words(self, input_words: Sequence[np.ndarray], n_words: int,
                  out: np.ndarray | None = None) -> np.ndarray:
        """Evaluate on bit-sliced inputs.

        Args:
            input_words: one ``uint64`` array of ``n_words`` per input bit (or the
                constant pools' zeros/ones arrays).
            n_words: words per array.
            out: optional ``(n_outputs, n_words)`` ``uint64`` array to fill.

        Returns:
            ``(n_outputs, n_words)`` ``uint64`` output words.
        """
        regs, zeros, ones = self._pool(n_words)
        if out is None:
            out = np.empty((self.n_outputs, n_words), dtype=np.uint64)
        self._kernel(list(input_words), out, regs, zeros, ones)
        return out

    def pack_inputs(self, columns: Sequence[np.ndarray]) -> tuple[list[np.ndarray], int]:
        """Bit-slice arbitrary input vectors.

        Args:
            columns: per input bit, a 0/1 array (all the same length ``n``).

        Returns:
            (list of ``uint64`` word arrays, number of words ``ceil(n / 64)``).
        """
        n = len(columns[0]) if columns else 0
        n_words = max(1, -(-n // 64))
        words = []
        for col in columns:
            buf = np.zeros(n_words * 64, dtype=np.uint8)
            buf[:n] = col
            words.append(np.packbits(buf, bitorder="little").view(np.uint64))
        return words, n_words

    def exhaustive_words(self, chunk_log2_vectors: int = 20) -> Iterator[tuple[int, int, np.ndarray]]:
        """Evaluate every input combination, in vector-index order, chunk by chunk.

        Args:
            chunk_log2_vectors: log2 of the vectors per chunk (at least 6).

        Yields:
            ``(first_vector, n_vectors, words)`` with ``words`` the ``(n_outputs, n_words)``
            output words of that chunk (a buffer reused by the next chunk: copy what you
            keep). When there are fewer than 64 vectors in all, the one word holds
            them in its low bits.
        """
        nbits = self.n_inputs
        total_log2 = nbits
        chunk_log2 = max(6, min(chunk_log2_vectors, max(total_log2, 6)))
        n_words = 1 << (chunk_log2 - 6)
        _, zeros, ones = self._pool(n_words)
        local: list[np.ndarray] = []
        for k in range(min(nbits, chunk_log2)):
            if k < 6:
                local.append(np.full(n_words, np.uint64(_LOW_PATTERNS[k]), dtype=np.uint64))
            else:
                idx = np.arange(n_words, dtype=np.uint64) >> np.uint64(k - 6)
                local.append((np.uint64(0) - (idx & np.uint64(1))).astype(np.uint64))
        out = np.empty((self.n_outputs, n_words), dtype=np.uint64)
        n_chunks = 1 << max(0, total_log2 - chunk_log2)
        per_chunk = min(1 << chunk_log2, 1 << total_log2)
        for c in range(n_chunks):
            inputs = list(local)
            for k in range(chunk_log2, nbits):
                inputs.append(ones if (c >> (k - chunk_log2)) & 1 else zeros)
            self.run_words(inputs, n_words, out)
            yield c * per_chunk, per_chunk, out


def _generate(inputs: list[Net], outputs: list[Net], cells: list[tuple[str, dict[str, Net]]]):
    """Generate the kernel source: topological order, liveness, buffer allocation.

    Returns:
        ``(source, number of buffers, number of gates evaluated)``.
    """
    driver = _drivers(inputs, cells)
    resolve = _buffer_resolver(cells, driver)
    outputs = [resolve(n) for n in outputs]
    gates = _cone(outputs, cells, driver, resolve)
    order = _toposort(gates, driver)
    body, n_regs = _emit(inputs, outputs, gates, order, driver)
    head = ["def kernel(I, O, R, ZEROS, ONES,",
            "           _and=_np.bitwise_and, _or=_np.bitwise_or, _xor=_np.bitwise_xor,",
            "           _not=_np.invert, _copy=_np.copyto):"]
    if inputs:
        head.append("    " + ", ".join(f"i{k}" for k in range(len(inputs))) + ", = I")
    if n_regs:
        head.append("    " + ", ".join(f"r{k}" for k in range(n_regs)) + ", = R")
    source = "import numpy as _np\n" + "\n".join(head + ["    " + line for line in body] + ["    return O", ""])
    return source, n_regs, len(order)


def _drivers(inputs: list[Net], cells: list[tuple[str, dict[str, Net]]]) -> dict[Net, int]:
    """Net -> index of the cell driving it; every cell type supported, every net driven once."""
    for ctype, _ in cells:
        if ctype not in GATE_TYPES:
            raise InvalidValueError(f"Unsupported cell type {ctype} (supported: {', '.join(sorted(GATE_TYPES))})")
    driver: dict[Net, int] = {}
    for i, (ctype, conn) in enumerate(cells):
        y = conn["Y"]
        if y in driver or y in inputs:
            raise InvalidValueError(f"Net {y} is driven more than once")
        driver[y] = i
    return driver


def _buffer_resolver(cells: list[tuple[str, dict[str, Net]]], driver: dict[Net, int]):
    """A function mapping a net to the net behind any chain of buffers (buffers are aliases)."""
    def resolve(net: Net) -> Net:
        depth = 0
        while isinstance(net, int) and net in driver and cells[driver[net]][0] == "$_BUF_":
            net = cells[driver[net]][1]["A"]
            depth += 1
            if depth > len(cells):
                raise InvalidValueError("Combinational loop through buffers")
        return net
    return resolve


def _cone(outputs: list[Net], cells: list[tuple[str, dict[str, Net]]], driver: dict[Net, int],
          resolve) -> dict[int, tuple[str, list[Net], Net]]:
    """The gates in the cone of the outputs (dead logic costs nothing): index -> (type, sources, output)."""
    needed: set[int] = set()
    stack = [driver[n] for n in outputs if n in driver]
    while stack:
        i = stack.pop()
        if i in needed:
            continue
        needed.add(i)
        for port in GATE_TYPES[cells[i][0]]:
            src = resolve(cells[i][1][port])
            if src in driver:
                stack.append(driver[src])
    return {i: (cells[i][0], [resolve(cells[i][1][p]) for p in GATE_TYPES[cells[i][0]]], cells[i][1]["Y"])
            for i in needed}


def _emit(inputs: list[Net], outputs: list[Net], gates: dict[int, tuple[str, list[Net], Net]],
          order: list[int], driver: dict[Net, int]) -> tuple[list[str], int]:
    """Kernel body lines in ``order``, reusing a buffer as soon as its net is dead; ``(lines, buffers)``."""
    last_use: dict[Net, int] = {}
    for step, i in enumerate(order):
        for src in gates[i][1]:
            last_use[src] = step
    input_pos = {net: k for k, net in enumerate(inputs) if isinstance(net, int)}
    out_pos: dict[Net, list[int]] = {}
    for k, net in enumerate(outputs):
        out_pos.setdefault(net, []).append(k)
    reg_of: dict[Net, int] = {}
    free: list[int] = []
    n_regs = 0

    def operand(net: Net) -> str:
        if net in reg_of:
            return f"r{reg_of[net]}"
        if net in input_pos:
            return f"i{input_pos[net]}"
        if net == "1":
            return "ONES"
        # Constants "0"/"x"/"z" and undriven wires read as 0.
        return "ZEROS"

    body = [f"_copy(O[{k}], {operand(net)})" for k, net in enumerate(outputs) if net not in driver]
    for step, i in enumerate(order):
        ctype, srcs, y = gates[i]
        if free:
            r = free.pop()
        else:
            r, n_regs = n_regs, n_regs + 1
        ops = dict(zip(GATE_TYPES[ctype], (operand(s) for s in srcs)))
        reg_of[y] = r
        body.append(_TEMPLATES[ctype].format(y=f"r{r}", **ops))
        body += [f"_copy(O[{k}], r{r})" for k in out_pos.get(y, ())]
        released = set()
        for src in srcs:
            if src in reg_of and last_use.get(src) == step and src not in released:
                released.add(src)
                free.append(reg_of.pop(src))
        if y not in last_use:  # output only (or dead): its buffer is free right away
            free.append(reg_of.pop(y))
    return body, n_regs


def _toposort(gates: dict[int, tuple[str, list[Net], Net]], driver: dict[Net, int]) -> list[int]:
    indeg = {i: 0 for i in gates}
    readers: dict[int, list[int]] = {i: [] for i in gates}
    for i, (_, srcs, _) in gates.items():
        for src in set(srcs):
            j = driver.get(src)
            if j is not None and j in gates:
                indeg[i] += 1
                readers[j].append(i)
    ready = sorted(i for i, d in indeg.items() if d == 0)
    order: list[int] = []
    while ready:
        i = ready.pop()
        order.append(i)
        for j in readers[i]:
            indeg[j] -= 1
            if indeg[j] == 0:
                ready.append(j)
    if len(order) != len(gates):
        raise InvalidValueError("The netlist has a combinational loop")
    return order
