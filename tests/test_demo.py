"""The end-to-end demo runs on a tiny budget and writes every file it announces."""

import json
import shutil
import subprocess
import sys

import pytest


@pytest.mark.simulator
@pytest.mark.skipif(shutil.which("iverilog") is None, reason="Icarus Verilog (iverilog) is not installed")
def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "appmult.demo", "--out", str(out), "--epochs", "1",
                           "--pretrain-epochs", "2", "--spec", "truncated:width=6,columns=5"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verify"] == {"simulator": "icarus", "pairs": 64 * 64, "passed": True}
    assert summary["rtl_check_passed"] is True
    assert "RTL MAC unit vs the retrained layer" in proc.stdout
    for rel in ("hw/appmult_mul.v", "hw/appmult_mac8.v", "characterization/lut.npz",
                "characterization/report.md", "characterization/error_heatmap.png",
                "retrain/results.json", "retrain/results.md", "retrain/curves.png"):
        assert (out / rel).is_file(), rel
    assert (out / "characterization/error_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "retrain/results.md").read_text()
    for mode in ("ste", "lut2d", "lut1d"):
        assert f"| {mode} |" in table
    assert "module appmult_mul(" in (out / "hw/appmult_mul.v").read_text()
