"""Plant one mutmut mutant in a copy of the package and run tests against it (mutation review).

Usage (after a ``make mutate`` run, whose ``mutants/`` holds the mutant)::

    .venv/bin/python tests/plant_mutant.py appmult.nn.kernels.x_fold__mutmut_10 tests/test_x.py [...]

prints ``KILLED`` (some test failed) or ``SURVIVED`` and exits 0 either way (2 on a usage or
planting error). The mutant's diff (``mutmut show``) is applied to a copy of ``appmult/`` in a
temporary directory, and the tests run with that copy first on ``PYTHONPATH`` through the
``pytest`` script -- not ``python -m pytest``, which puts the working directory, and with it
this checkout's own ``appmult/``, ahead of ``PYTHONPATH`` (a planted copy then never runs:
every mutant "survives"). The checkout itself is not touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"


class PlantError(Exception):
    """The mutant cannot be planted (unknown, or its lines not found exactly once)."""


def mutant_diff(name: str) -> tuple[str, str, str]:
    """``(path, original lines, mutated lines)`` of the mutant, from ``mutmut show``."""
    show = subprocess.run([str(VENV_BIN / "mutmut"), "show", name], cwd=ROOT, capture_output=True, text=True)
    lines = show.stdout.splitlines()
    paths = [line[4:].strip() for line in lines if line.startswith("--- ")]
    if show.returncode or not paths:
        raise PlantError(f"mutmut has no mutant {name!r} (run make mutate first?)")
    minus = [line[1:] for line in lines if line.startswith("-") and not line.startswith("---")]
    plus = [line[1:] for line in lines if line.startswith("+") and not line.startswith("+++")]
    return paths[0], "\n".join(minus), "\n".join(plus)


def plant(name: str, tree: Path) -> None:
    """Copy ``appmult/`` into ``tree`` with the mutant's lines replaced (they must occur once)."""
    path, old, new = mutant_diff(name)
    src = (ROOT / path).read_text()
    if src.count(old) != 1:
        raise PlantError(f"the lines of {name} occur {src.count(old)} times in {path}, not once; plant it by "
                         f"hand:\n{old}")
    shutil.copytree(ROOT / "appmult", tree / "appmult", ignore=shutil.ignore_patterns("__pycache__"))
    (tree / path).write_text(src.replace(old, new))


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    name, tests = argv[0], argv[1:]
    with tempfile.TemporaryDirectory(prefix="plant-") as tmp:
        tree = Path(tmp)
        try:
            plant(name, tree)
        except PlantError as exc:
            print(f"plant_mutant: {exc}", file=sys.stderr)
            return 2
        env = dict(os.environ, PYTHONPATH=str(tree), NUMBA_CACHE_DIR=str(tree / "numba-cache"))
        run = subprocess.run([str(VENV_BIN / "pytest"), "-q", "-x", "-p", "no:cacheprovider", *tests],
                             cwd=ROOT, env=env, capture_output=True, text=True)
    last = [line for line in run.stdout.splitlines() if line.strip()]
    print(f"{name}: {'KILLED' if run.returncode else 'SURVIVED'} ({last[-1] if last else run.stderr[-200:]})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
