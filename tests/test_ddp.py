"""Scale-out: the retraining workflow under ``torchrun --nproc_per_node=2`` (DDP, gloo, CPU).

Both ranks must end with bit-identical models (parameters and activation ranges), and
only rank 0 may write into the output directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

SPEC = "truncated:width=6,signed=false,columns=4"

DRIVER = textwrap.dedent("""
    import json, os, sys
    from appmult.flows import RetrainConfig, run_retrain
    lut, out, pre, marks = sys.argv[1:5]
    cfg = RetrainConfig(lut=lut, model="mlp", dataset="digits", epochs=2, pretrain_epochs=1,
                        batch_size=64, grads=("ste", "lut1d"), simulated_error=True, out=out,
                        pretrained_dir=pre, progress=False, calib_batches=2, threads=1,
                        time_exact=False)
    res = run_retrain(cfg)
    rank = os.environ["RANK"]
    with open(os.path.join(marks, f"rank{rank}.json"), "w") as f:
        json.dump({"world": res["distributed"]["world_size"],
                   "digests": {m: r["state_sha256"] for m, r in res["modes"].items()},
                   "after": {m: r["approx_after"] for m, r in res["modes"].items()}}, f)
""")


@pytest.mark.slow
def test_two_ranks_end_identical(tmp_path):
    pytest.importorskip("amaranth")
    from appmult.flows import characterize
    lut = tmp_path / "trunc6.npz"
    characterize(SPEC, progress=False, cost=False).save(lut)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out, pre, marks = tmp_path / "out", tmp_path / "pre", tmp_path / "marks"
    marks.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(driver), str(lut), str(out), str(pre), str(marks)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((marks / "rank0.json").read_text())
    r1 = json.loads((marks / "rank1.json").read_text())
    assert r0["world"] == r1["world"] == 2
    assert set(r0["digests"]) == {"ste", "lut1d", "simulated-error"}
    assert r0["digests"] == r1["digests"]
    assert r0["after"] == r1["after"]
    # Rank 0 wrote the results; nothing else appeared in the output directory.
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "modes", "results.json", "results.md"]
    res = json.loads((out / "results.json").read_text())
    assert res["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert {m: r["state_sha256"] for m, r in res["modes"].items()} == r0["digests"]
    # Each rank saw half of every epoch's batch of 64.
    hist = res["modes"]["ste"]["history"]
    assert [r["epoch"] for r in hist] == [1, 2]
