"""The scripts in examples/ run as a user would run them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_custom_multiplier_example(tmp_path):
    # Run in a fresh interpreter: the example registers its own family, which must not leak
    # into this test session's registry. cwd=tmp_path because it writes its Verilog there.
    result = subprocess.run([sys.executable, str(EXAMPLES / "custom_multiplier.py")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4096 pairs, 0 differ from the model" in result.stdout
    verilog = (tmp_path / "droplsb_6x6.v").read_text()
    assert "module droplsb_6x6(" in verilog
