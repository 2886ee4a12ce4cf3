"""Exhaustive (or sampled) bit-parallel evaluation of candidate circuits, incrementally.

Every operand pair is one bit of a 64-bit word; vector ``v = a_code * 2**width_b +
b_code`` (the order of :meth:`appmult.sim.Netlist.exhaustive`). The values of every node
of the current parent circuit are kept; a candidate recomputes only the gates in the
cone of what it changed (plus gates that were inactive in the parent and are read now),
then the error sums come straight from the bit-sliced outputs: ``approx - exact`` by a
ripple subtraction across the bit planes, ``|e|`` by a conditional negation, and the
sums by population counts. Per-vector values are unpacked only for the weighted sums
(MRE, MSE, distribution-weighted errors).

Operands of up to 12 bits are evaluated exhaustively (above 2**20 pairs, in chunks
without the incremental shortcut); wider ones on a seeded random sample plus corner
cases, and results say ``exhaustive: false``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ..codes import codes_to_values
from ..errors import InvalidValueError
from . import _kernels as K
from .genome import Genome

__all__ = ["EXHAUSTIVE_MAX_WIDTH", "Evaluation", "Evaluator"]

#: Widest operand evaluated exhaustively.
EXHAUSTIVE_MAX_WIDTH = 12
#: Vectors per chunk (2**20 pairs: one chunk up to 10x10 operands).
_CHUNK_LOG2 = 20
#: Default number of sampled pairs for operands wider than EXHAUSTIVE_MAX_WIDTH.
DEFAULT_SAMPLES = 1 << 18


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Error figures of one candidate (units as in :mod:`appmult.lut_gen.metrics`).

    ``mae_pct``/``wce_pct`` are percentages of ``2**(width_a + width_b)``; ``er_pct`` and
    ``mre_pct`` percentages; ``mse`` and ``wce`` absolute. Weighted figures (when the
    evaluator has operand distributions) replace the uniform ones for ``mae``, ``mse``,
    ``er`` and ``mre``; ``wce`` is then the maximum over pairs of non-zero weight.
    """

    mae_pct: float
    wce_pct: float
    wce: int
    er_pct: float
    mre_pct: float
    mse: float

    def get(self, metric: str) -> float:
        """The figure an objective name refers to (``mae`` -> ``mae_pct`` ...)."""
        return float(getattr(self, _FIELD[metric]))


_FIELD = {"mae": "mae_pct", "wce": "wce_pct", "er": "er_pct", "mre": "mre_pct", "mse": "mse"}


class Evaluator:
    """Evaluates genomes of one width/signedness against the exact product.

    Args:
        width_a: width of operand ``a``.
        width_b: width of operand ``b``.
        signed: two's complement.
        p_a: distribution of ``a`` codes (length ``2**width_a``), or ``None`` (uniform).
        p_b: distribution of ``b`` codes, or ``None``.
        unpack: compute MRE/MSE/weighted sums (slower); needed unless the objective
            and constraints use only MAE, WCE and ER under the uniform distribution.
        samples: pairs sampled for operands wider than 12 bits.
        seed: seed of that sample.
        lam: number of candidate buffers (children per generation).
        use_numba: use the compiled kernels (default: when numba is available).
    """

    def __init__(self, width_a: int, width_b: int, signed: bool, *, p_a=None, p_b=None, unpack: bool = True,
                 samples: int = DEFAULT_SAMPLES, seed: int = 0, lam: int = 1, use_numba: bool | None = None):
        self.width_a, self.width_b, self.signed = int(width_a), int(width_b), bool(signed)
        self.width_p = self.width_a + self.width_b
        self.n_in = 2 + self.width_p
        self.use_numba = K.numba_available() if use_numba is None else bool(use_numba)
        self._eval_gates = K.eval_gates if self.use_numba else K.eval_gates_numpy
        self._error_sums = K.error_sums if self.use_numba else K.error_sums_numpy
        self.exhaustive = max(self.width_a, self.width_b) <= EXHAUSTIVE_MAX_WIDTH
        self.weighted = p_a is not None or p_b is not None
        self.unpack = bool(unpack) or self.weighted
        if self.exhaustive:
            total = 1 << self.width_p
            starts = range(0, total, 1 << _CHUNK_LOG2)
            self.n_vectors = total
            self._chunks = [self._chunk(*self._exhaustive_codes(s, min(total, s + (1 << _CHUNK_LOG2))), p_a, p_b)
                            for s in starts]
        else:
            a, b = self._sample_codes(samples, seed)
            self._sample = (a, b)
            self.n_vectors = a.size
            self._chunks = [self._chunk(a[s:s + (1 << _CHUNK_LOG2)], b[s:s + (1 << _CHUNK_LOG2)], p_a, p_b)
                            for s in range(0, a.size, 1 << _CHUNK_LOG2)]
        if self.weighted:
            total_w = sum(float(c["wv"].sum()) for c in self._chunks)
            total_r = sum(float(c["wr_mass"]) for c in self._chunks)
        else:
            total_w = float(self.n_vectors)
            total_r = sum(float(c["wr_mass"]) for c in self._chunks)
        for c in self._chunks:
            c["wv"] = c["wv"] / total_w if total_w > 0 else c["wv"]
            c["wr"] = c["wr"] / total_r if total_r > 0 else c["wr"]
        self.lam = max(1, int(lam))
        self._parent: Genome | None = None
        self._vp: np.ndarray | None = None
        self._valid: np.ndarray | None = None
        self._buffers: list[dict[str, Any]] = []
        self.evaluations = 0

    # -- set-up -------------------------------------------------------------------------------
    def _exhaustive_codes(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        v = np.arange(start, stop, dtype=np.int64)
        return v >> self.width_b, v & ((1 << self.width_b) - 1)

    def _sample_codes(self, samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 64:
            raise InvalidValueError(f"samples must be an integer of at least 64, not {samples!r}")
        corners_a = _corner_codes(self.width_a, self.signed)
        corners_b = _corner_codes(self.width_b, self.signed)
        ca, cb = np.meshgrid(corners_a, corners_b, indexing="ij")
        rng = np.random.default_rng(seed)
        n = max(0, samples - ca.size)
        a = np.concatenate([ca.ravel(), rng.integers(0, 1 << self.width_a, size=n)])
        b = np.concatenate([cb.ravel(), rng.integers(0, 1 << self.width_b, size=n)])
        return a.astype(np.int64), b.astype(np.int64)

    def _chunk(self, a: np.ndarray, b: np.ndarray, p_a, p_b) -> dict[str, Any]:
        n = a.size
        n_words = max(1, -(-n // 64))

        def pack(bits: np.ndarray) -> np.ndarray:
            buf = np.zeros(n_words * 64, dtype=np.uint8)
            buf[:n] = bits
            return np.packbits(buf, bitorder="little").view(np.uint64).copy()

        rows = np.empty((self.n_in, n_words), dtype=np.uint64)
        rows[0] = 0
        rows[1] = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
        for i in range(self.width_a):
            rows[2 + i] = pack((a >> i) & 1)
        for j in range(self.width_b):
            rows[2 + self.width_a + j] = pack((b >> j) & 1)
        va = codes_to_values(a, self.width_a, self.signed)
        vb = codes_to_values(b, self.width_b, self.signed)
        exact = va * vb
        e = np.empty((self.width_p + 1, n_words), dtype=np.uint64)
        for k in range(self.width_p + 1):
            e[k] = pack((exact >> k) & 1)
        w = np.ones(n, dtype=np.float64)
        if p_a is not None:
            w *= _check_dist(p_a, self.width_a, "p_a")[a]
        if p_b is not None:
            w *= _check_dist(p_b, self.width_b, "p_b")[b]
        valid = pack(w > 0)
        if not self.unpack:  # per-vector weights are read only by the unpacking sums
            return {"rows": rows, "e": e, "valid": valid, "wv": np.zeros(1), "wr": np.zeros(1),
                    "wr_mass": 0.0, "n_words": n_words}
        wv = np.zeros(n_words * 64)
        wv[:n] = w
        wr = np.zeros(n_words * 64)
        nonzero = exact != 0
        wr[:n][nonzero] = w[nonzero] / np.abs(exact[nonzero])
        return {"rows": rows, "e": e, "valid": valid, "wv": wv, "wr": wr,
                "wr_mass": float(w[nonzero].sum()), "n_words": n_words}

    @property
    def incremental(self) -> bool:
        """Whether candidates are evaluated incrementally (one chunk of vectors)."""
        return len(self._chunks) == 1

    # -- evaluation ---------------------------------------------------------------------------
    def _empty_plan(self, n_nodes: int) -> dict[str, np.ndarray]:
        return {"active": np.zeros(n_nodes, bool), "dirty": np.zeros(n_nodes, bool),
                "recompute": np.zeros(n_nodes, bool)}

    def _finish(self, counts: np.ndarray, stats: np.ndarray) -> Evaluation:
        scale = 100.0 / (1 << self.width_p)
        if self.weighted:
            mae, er, mse = stats[2], 100.0 * stats[4], stats[3]
        else:
            total = int(counts @ (np.int64(1) << np.arange(counts.size, dtype=np.int64)))
            mae = total / self.n_vectors
            er = 100.0 * stats[0] / self.n_vectors
            mse = stats[3]
        return Evaluation(mae_pct=float(mae * scale), wce_pct=float(stats[1] * scale), wce=int(stats[1]),
                          er_pct=float(er), mre_pct=float(100.0 * stats[5]), mse=float(mse))

    def _sums(self, chunk, o, counts, stats) -> None:
        self._error_sums(o, chunk["e"], chunk["valid"], self.signed, self.unpack, chunk["wv"], chunk["wr"],
                         counts, stats)

    def evaluate(self, genome: Genome) -> Evaluation:
        """Evaluate a genome from scratch (no parent values used or changed)."""
        self._check(genome)
        counts = np.zeros(self.width_p + 1, np.int64)
        stats = np.zeros(6, np.float64)
        plan = self._empty_plan(genome.n_nodes)
        changed = np.ones(genome.n_nodes, bool)
        valid = np.zeros(genome.n_nodes, bool)
        K.plan(genome.tt, genome.src, genome.out, self.n_in, changed, valid, plan["active"], plan["dirty"],
               plan["recompute"])
        for chunk in self._chunks:
            v = np.empty((genome.n_nodes, chunk["n_words"]), dtype=np.uint64)
            v[:self.n_in] = chunk["rows"]
            self._eval_gates(genome.tt, genome.src, self.n_in, plan["recompute"], v, v)
            self._sums(chunk, v[genome.out], counts, stats)
        self.evaluations += 1
        return self._finish(counts, stats)

    def outputs(self, genome: Genome) -> np.ndarray:
        """Product values of every evaluated pair (vector order), for tests and checks."""
        self._check(genome)
        plan = self._empty_plan(genome.n_nodes)
        K.plan(genome.tt, genome.src, genome.out, self.n_in, np.ones(genome.n_nodes, bool),
               np.zeros(genome.n_nodes, bool), plan["active"], plan["dirty"], plan["recompute"])
        parts = []
        for chunk in self._chunks:
            v = np.empty((genome.n_nodes, chunk["n_words"]), dtype=np.uint64)
            v[:self.n_in] = chunk["rows"]
            self._eval_gates(genome.tt, genome.src, self.n_in, plan["recompute"], v, v)
            o = np.ascontiguousarray(v[genome.out])
            bits = np.unpackbits(o.view(np.uint8).reshape(o.shape[0], -1), axis=1, bitorder="little")
            vals = (bits.astype(np.int64) << np.arange(self.width_p, dtype=np.int64)[:, None]).sum(axis=0)
            parts.append(vals)
        vals = np.concatenate(parts)[:self.n_vectors]
        if self.signed:
            vals = np.where(vals >= 1 << (self.width_p - 1), vals - (1 << self.width_p), vals)
        return vals

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """Operand codes ``(a, b)`` of the evaluated pairs, in vector order."""
        if self.exhaustive:
            return self._exhaustive_codes(0, self.n_vectors)
        return self._sample[0].copy(), self._sample[1].copy()

    def set_parent(self, genome: Genome) -> Evaluation:
        """Make ``genome`` the parent: compute and keep the values of its active gates."""
        self._check(genome)
        if not self.incremental:
            self._parent = genome.copy()
            return self.evaluate(genome)
        chunk = self._chunks[0]
        n_nodes, n_words = genome.n_nodes, chunk["n_words"]
        if self._vp is None or self._vp.shape[0] != n_nodes:
            self._vp = np.empty((n_nodes, n_words), dtype=np.uint64)
            self._vp[:self.n_in] = chunk["rows"]
            self._buffers = [{"vc": np.empty((n_nodes, n_words), dtype=np.uint64),
                              "o": np.empty((self.width_p, n_words), dtype=np.uint64), **self._empty_plan(n_nodes)}
                             for _ in range(self.lam)]
        self._valid = np.zeros(n_nodes, bool)
        self._valid[:self.n_in] = True
        plan = self._empty_plan(n_nodes)
        K.plan(genome.tt, genome.src, genome.out, self.n_in, np.ones(n_nodes, bool), self._valid,
               plan["active"], plan["dirty"], plan["recompute"])
        self._eval_gates(genome.tt, genome.src, self.n_in, plan["recompute"], self._vp, self._vp)
        self._valid[plan["recompute"]] = True
        self._parent = genome.copy()
        counts = np.zeros(self.width_p + 1, np.int64)
        stats = np.zeros(6, np.float64)
        self._sums(chunk, self._vp[genome.out], counts, stats)
        self.evaluations += 1
        return self._finish(counts, stats)

    def evaluate_child(self, child: Genome, slot: int = 0) -> Evaluation:
        """Evaluate a child of the current parent, recomputing only what changed.

        Args:
            child: a genome with the parent's node count.
            slot: buffer to use (``0 .. lam-1``); :meth:`accept` takes the slot back.
        """
        if not self.incremental:
            return self.evaluate(child)
        parent = self._parent
        if parent is None or child.n_gates != parent.n_gates:
            raise InvalidValueError("evaluate_child needs a parent of the same size: call set_parent first")
        buf = self._buffers[slot]
        changed = np.zeros(child.n_nodes, bool)
        changed[self.n_in:] = (child.tt != parent.tt) | (child.src != parent.src).any(axis=1)
        K.plan(child.tt, child.src, child.out, self.n_in, changed, self._valid, buf["active"], buf["dirty"],
               buf["recompute"])
        vc = buf["vc"]
        self._eval_gates(child.tt, child.src, self.n_in, buf["recompute"], self._vp, vc)
        o = buf["o"]
        K.gather_outputs(child.out, buf["recompute"], self._vp, vc, o)
        counts = np.zeros(self.width_p + 1, np.int64)
        stats = np.zeros(6, np.float64)
        self._sums(self._chunks[0], o, counts, stats)
        self.evaluations += 1
        return self._finish(counts, stats)

    def accept(self, child: Genome, slot: int = 0) -> None:
        """Make the child evaluated in ``slot`` the new parent (its values move over)."""
        if not self.incremental:
            self._parent = child.copy()
            return
        buf = self._buffers[slot]
        rec = buf["recompute"]
        idx = np.flatnonzero(rec)
        self._vp[idx] = buf["vc"][idx]
        self._valid[buf["dirty"] & ~rec] = False
        self._valid[idx] = True
        self._parent = child.copy()

    def _check(self, genome: Genome) -> None:
        if (genome.width_a, genome.width_b, genome.signed) != (self.width_a, self.width_b, self.signed):
            raise InvalidValueError(f"A {genome.width_a}x{genome.width_b} {'signed' if genome.signed else 'unsigned'}"
                                    f" circuit cannot be evaluated by a {self.width_a}x{self.width_b} "
                                    f"{'signed' if self.signed else 'unsigned'} evaluator")


def _corner_codes(width: int, signed: bool) -> np.ndarray:
    top = (1 << width) - 1
    half = 1 << (width - 1)
    codes = {0, 1, 2, top, top - 1, half, half - 1, half + 1}
    return np.array(sorted(codes), dtype=np.int64)


def _check_dist(p, width: int, name: str) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if p.shape != (1 << width,) or not np.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
        raise InvalidValueError(f"{name} must be {1 << width} non-negative weights with a positive sum, "
                                f"not an array of shape {p.shape}")
    return p / p.sum()
