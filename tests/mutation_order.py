"""Killer-first test order and accepted equivalent mutants for ``make mutate``.

mutmut runs, for each mutant, every test that covers the mutated function, in no
particular order, and stops at the first failure (``-x``). A killed mutant therefore
costs every passing test run before the one that kills it. This module remembers, per
mutated function, which tests killed its mutants in earlier runs, and runs those first:
the order changes how long a run takes, never which mutants are killed (every covering
test still runs when none fails).

The memory is ``tests/mutation_killers.json`` (committed, so that a fresh clone's first
run is fast too): ``{"tests": [node ids], "kills": {function: {test index: count}}}``,
``count`` being how many of that function's mutants the test killed first. A run logs each
first kill to ``mutants/mutation-kills.log`` (one ``mutant<TAB>node id`` line, appended by
the mutant's own process), and ``python tests/mutation_order.py merge`` folds the log in
after the run (``make mutate`` does). A missing or stale entry only costs time: tests the
memory does not name keep mutmut's order after the remembered ones.

Equivalent mutants (reviewed: no test can tell them from the original; reasons in
``tests/README.md``) would otherwise run every test of their function in every run, most
of a run's time. ``tests/mutation_equivalents.tsv`` lists them with mutmut's hash of their
function's source; while that hash is unchanged, ``make mutate`` reports them as skipped
(mutmut's status 34) without running tests. Changing a function voids the entries of its
mutants, which then run (and, surviving, show up for review) again.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from pathlib import Path

HISTORY = Path(__file__).with_name("mutation_killers.json")
LOG_NAME = "mutation-kills.log"
EQUIVALENTS = Path(__file__).with_name("mutation_equivalents.tsv")
EQUIVALENTS_HEADER = """\
# Mutants reviewed as equivalent (reasons: tests/README.md), with mutmut's hash of their
# function's source when accepted. make mutate reports them as skipped instead of running
# every test of their function; a changed function voids its entries (its mutants run again).
# Add with: python tests/mutation_order.py accept mutants NAME...
"""
SKIP_EXIT_CODE = 34  # mutmut's "skipped"


def function_of(mutant: str) -> str:
    """``appmult.codes.x_check_codes__mutmut_12`` -> ``appmult.codes.x_check_codes``."""
    head, sep, tail = mutant.rpartition("__mutmut_")
    if not sep or not tail.isdigit():
        raise ValueError(f"not a mutmut mutant name: {mutant!r}")
    return head


def load(path: Path | None = None) -> dict[str, dict[str, int]]:
    """The remembered kills as ``{function: {node id: count}}`` (empty if no file)."""
    path = HISTORY if path is None else path
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    tests = raw["tests"]
    return {function: {tests[int(i)]: int(n) for i, n in kills.items()}
            for function, kills in raw["kills"].items()}


def save(history: dict[str, dict[str, int]], path: Path | None = None) -> None:
    """Write ``history`` compactly (tests by index) and atomically."""
    path = HISTORY if path is None else path
    tests = sorted({test for kills in history.values() for test in kills})
    index = {test: i for i, test in enumerate(tests)}
    raw = {"tests": tests,
           "kills": {function: {str(index[t]): n for t, n in sorted(kills.items())}
                     for function, kills in sorted(history.items()) if kills}}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(raw, indent=0, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_log(path: Path) -> dict[str, dict[str, int]]:
    """A run's log as ``{function: {node id: count}}``; a mutant counted once (its last line)."""
    killer_of: dict[str, str] = {}
    for line in path.read_text().splitlines():
        mutant, sep, test = line.partition("\t")
        if sep and test:
            killer_of[mutant] = test
    kills: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for mutant, test in killer_of.items():
        kills[function_of(mutant)][test] += 1
    return {f: dict(k) for f, k in kills.items()}


def merge(history: dict[str, dict[str, int]], run: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """A function the run killed mutants of takes the run's kills; the others keep theirs.

    Replacing (not adding) keeps the memory of the current tests: a test that stopped
    killing a function's mutants stops being run first for it. A rerun of a few mutants
    replaces its function's entry with those few, which only reorders the next run."""
    merged = {f: dict(k) for f, k in history.items()}
    merged.update({f: dict(k) for f, k in run.items()})
    return merged


def killer_first(node_ids: list[str], remembered: dict[str, int]) -> list[int]:
    """Positions of ``node_ids`` in run order: remembered killers first (most kills
    first, ties in the given order), then the rest in the given order."""
    first = sorted((i for i, t in enumerate(node_ids) if t in remembered),
                   key=lambda i: -remembered[node_ids[i]])
    chosen = set(first)
    return first + [i for i in range(len(node_ids)) if i not in chosen]


def function_hashes(mutants_dir: Path) -> dict[str, str]:
    """mutmut's hash of each mutated function's source, by function (``module.x_name``),
    from the ``.meta`` files of a generated ``mutants/`` tree."""
    hashes = {}
    for meta in Path(mutants_dir).rglob("*.py.meta"):
        module = ".".join(meta.relative_to(mutants_dir).with_suffix("").with_suffix("").parts)
        for name, h in json.loads(meta.read_text()).get("hash_by_function_name", {}).items():
            hashes[f"{module}.{name}"] = h
    return hashes


def load_equivalents(path: Path | None = None) -> dict[str, str]:
    """Accepted equivalent mutants: ``{mutant name: hash of its function when accepted}``."""
    path = EQUIVALENTS if path is None else path
    accepted = {}
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            name, h = line.split()
            accepted[name] = h
    return accepted


def still_equivalent(accepted: dict[str, str], hashes: dict[str, str]) -> frozenset[str]:
    """The accepted mutants whose function is unchanged since they were accepted (a changed
    function renumbers and changes its mutants: they run again, for a new review)."""
    return frozenset(m for m, h in accepted.items() if hashes.get(function_of(m)) == h)


def accept(names: list[str], mutants_dir: Path, path: Path | None = None) -> int:
    """Add ``names`` to the accepted equivalents with their functions' current hashes."""
    path = EQUIVALENTS if path is None else path
    hashes = function_hashes(mutants_dir)
    accepted = load_equivalents(path)
    for name in names:
        h = hashes.get(function_of(name))
        if h is None:
            raise SystemExit(f"{name}: no such mutated function in {mutants_dir}")
        accepted[name] = h
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(EQUIVALENTS_HEADER + "".join(f"{m}\t{h}\n" for m, h in sorted(accepted.items())))
    os.replace(tmp, path)
    return len(names)


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "accept":
        print(f"{accept(argv[2:], Path(argv[1]))} mutants accepted as equivalent in {EQUIVALENTS.name}")
        return 0
    if len(argv) != 2 or argv[0] != "merge":
        print("usage: python tests/mutation_order.py merge MUTANTS_DIR\n"
              "       python tests/mutation_order.py accept MUTANTS_DIR MUTANT_NAME...", file=sys.stderr)
        return 2
    log = Path(argv[1]) / LOG_NAME
    if not log.exists():
        print(f"{log}: no kills logged, {HISTORY.name} unchanged")
        return 0
    run = read_log(log)
    save(merge(load(), run))
    log.unlink()
    print(f"{HISTORY.name}: kills of {sum(map(len, run.values()))} (function, test) pairs "
          f"from {sum(n for k in run.values() for n in k.values())} mutants merged")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
