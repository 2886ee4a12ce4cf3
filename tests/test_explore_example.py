"""examples/explore_and_verify.py runs as a user would run it: explore, pick, export, verify."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_explore_and_verify_example(tmp_path):
    result = subprocess.run([sys.executable, str(EXAMPLES / "explore_and_verify.py")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "re-synthesized, MAE" in result.stdout
    assert ("Icarus: 4096 pairs, 0 differ from the LUT (exhaustive)" in result.stdout
            or "RTL check skipped" in result.stdout)
    assert "module explored_6x6(" in (tmp_path / "explored_6x6.v").read_text()
