"""Bad input to ``appmult retrain`` and ``appmult assign`` found by fuzzing, and the exact
one-line message each gets (exit status 2, no traceback); next to each, the good neighbour
that must still be accepted.

The values are checked by the config dataclasses (:class:`RetrainConfig`,
:class:`AssignConfig`), so the Python API refuses them too; what needs the file system or
the command line's own advice (``--resume``, a spec too wide for a LUT) is checked by the
command.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import exact
from test_trust import small_lut

from appmult.cli import build_parser, main
from appmult.cli._config import build_config

pytest.importorskip("torch")  # building a config looks its names up in train/nn/methods

from appmult.flows import AssignConfig, RetrainConfig, RetrainError  # noqa: E402
from appmult.methods import AssignError  # noqa: E402

WIDE = "Full product LUTs are limited to 12x12 operands"


def _lut(tmp: Path) -> str:
    return str(small_lut().save(tmp / "lut.npz"))


def retrain(capsys, tmp: Path, *argv) -> tuple[int, str]:
    """``appmult retrain --lut <4x4 LUT> --out tmp/run --no-progress *argv``: exit status and stderr."""
    capsys.readouterr()
    code = main(["retrain", "--lut", _lut(tmp), "--out", str(tmp / "run"), "--no-progress", *map(str, argv)])
    return code, capsys.readouterr().err


def parsed_config(tmp: Path, *argv) -> RetrainConfig:
    """The RetrainConfig the command line builds (no run)."""
    args = build_parser().parse_args(["retrain", "--lut", _lut(tmp), "--out", str(tmp / "run"), *map(str, argv)])
    return build_config(RetrainConfig, args)


def error(command: str, message: str) -> str:
    return f"appmult {command}: error: {message}\n"


# --- 1. --mre is a fraction -----------------------------------------------------------------------

def test_mre_fraction(tmp_path):
    cfg = parsed_config(tmp_path, "--simulated-error", "--mre", "0.05")
    assert (cfg.simulated_error, cfg.mre) == (True, 0.05)
    assert parsed_config(tmp_path, "--simulated-error", "--mre", "1").mre == 1.0
    assert parsed_config(tmp_path, "--simulated-error").mre is None  # the LUT's own MRE, whatever it is


def test_mre_fraction_wrong(tmp_path, capsys):
    # 5 meant 5% but was taken as 500% noise.
    assert retrain(capsys, tmp_path, "--simulated-error", "--mre", "5") == \
        (2, error("retrain", "mre is a fraction (0.05 for 5%) and must be at most 1, not 5.0"))
    with pytest.raises(RetrainError, match=exact("mre is a fraction (0.05 for 5%) and must be at most 1, not 1.5")):
        RetrainConfig(lut="m.npz", simulated_error=True, mre=1.5)


# --- 2. --mre without --simulated-error -----------------------------------------------------------

def test_mre_without_simulated_error_wrong(tmp_path, capsys):
    message = "mre sets the noise of --simulated-error, which is off: add --simulated-error or leave out --mre"
    assert retrain(capsys, tmp_path, "--mre", "0.05") == (2, error("retrain", message))
    with pytest.raises(RetrainError, match=exact(message)):
        RetrainConfig(lut="m.npz", mre=0.05)


# --- 3. --milestones: below --epochs ---------------------------------------------------------

def test_milestones(tmp_path):
    assert parsed_config(tmp_path, "--milestones", "1", "2").milestones == (1, 2)
    assert parsed_config(tmp_path, "--milestones", "2", "--epochs", "3").milestones == (2,)
    assert parsed_config(tmp_path, "--milestones", "20", "25", "--recipe", "date25").milestones == (20, 25)
    # A recipe's own milestones are the recipe's protocol, recorded as such, also in a shorter run.
    assert parsed_config(tmp_path, "--recipe", "date25", "--epochs", "2").milestones == (10, 20)
    assert parsed_config(tmp_path, "--epochs", "9").milestones == (3, 6)


def test_milestones_in_any_order(tmp_path):
    # The order does not matter to the schedule (halved after each listed epoch): sorted, each once.
    assert parsed_config(tmp_path, "--milestones", "2", "1").milestones == (1, 2)
    assert parsed_config(tmp_path, "--epochs", "5", "--milestones", "2", "2").milestones == (2,)


@pytest.mark.parametrize("argv, epochs, bad", [
    (("--milestones", "100"), 3, 100),  # the plain 3 epochs
    (("--epochs", "3", "--milestones", "1", "3"), 3, 3),  # halved after the last epoch: never used
    (("--recipe", "date25", "--milestones", "10", "30"), 30, 30),
])
def test_milestones_not_below_epochs_wrong(tmp_path, capsys, argv, epochs, bad):
    message = (f"milestones must be below epochs ({epochs}): the learning rate is halved after each milestone "
               f"epoch, so {bad} would never take effect")
    assert retrain(capsys, tmp_path, *argv) == (2, error("retrain", message))


# --- 4. --resume with nothing to resume -----------------------------------------------------------

def _fake_run(out: Path) -> None:
    # What an interrupted run leaves: a mode directory with its run.json (flows.retrain_mode), here
    # with the settings of a default command line (a resume with others is refused before any work).
    from appmult.flows.retrain_mode import _settings_identity
    (out / "modes" / "ste").mkdir(parents=True)
    settings = _settings_identity(RetrainConfig(lut="m.npz", out=str(out)), "ste")
    (out / "modes" / "ste" / "run.json").write_text(json.dumps(settings))


def test_resume_finds_the_run(tmp_path, capsys):
    # The --resume check passes; the run then stops at the LUT (a directory), the first thing it reads.
    _fake_run(tmp_path / "run")
    capsys.readouterr()
    code = main(["retrain", "--lut", str(tmp_path), "--out", str(tmp_path / "run"), "--no-progress", "--resume"])
    assert (code, capsys.readouterr().err) == (2, error("retrain", f"LUT file {tmp_path} is a directory, not a file"))


@pytest.mark.parametrize("state", ["missing", "empty", "pretrained only"])
def test_resume_without_a_run_wrong(tmp_path, capsys, state):
    out = tmp_path / "run"
    if state != "missing":
        out.mkdir()
    if state == "pretrained only":  # the FP32 cache of a run interrupted while pretraining: no run yet
        (out / "pretrained").mkdir()
    assert retrain(capsys, tmp_path, "--resume") == \
        (2, error("retrain", f"Cannot resume: no retraining run in {out}; leave out --resume to start one"))
    assert sorted(p.name for p in out.rglob("*")) == (["pretrained"] if state == "pretrained only" else [])


# --- 5. --data-dir for a dataset that reads no files ----------------------------------------------

def test_data_dir():
    assert RetrainConfig(lut="m.npz", dataset="mnist", data_dir="d").data_dir == "d"
    assert RetrainConfig(lut="m.npz", dataset="cifar100", data_dir="d").data_dir == "d"
    assert AssignConfig(candidates=("a",), dataset="cifar10", data_dir="d").data_dir == "d"
    assert RetrainConfig(lut="m.npz").data_dir is None


@pytest.mark.parametrize("dataset", ["digits", "mnist5k"])
def test_data_dir_wrong(tmp_path, capsys, dataset):
    message = (f"Dataset {dataset!r} ships inside a Python package and reads no --data-dir (only 'mnist', "
               f"'cifar10', 'cifar100' do); leave --data-dir out")
    assert retrain(capsys, tmp_path, "--dataset", dataset, "--data-dir", tmp_path) == (2, error("retrain", message))
    capsys.readouterr()
    assert main(["assign", "exact:width=4", "--dataset", dataset, "--data-dir", str(tmp_path), "--out",
                 str(tmp_path / "a"), "--no-progress"]) == 2
    assert capsys.readouterr().err == error("assign", message)
    with pytest.raises(RetrainError, match=exact(message)):
        RetrainConfig(lut="m.npz", dataset=dataset, data_dir="d")
    with pytest.raises(AssignError, match=exact(message)):
        AssignConfig(candidates=("a",), dataset=dataset, data_dir="d")


# --- 6. a spec too wide for a LUT: advice for the command line ------------------------------------

def test_wide_spec_python_message():
    # The Python API keeps its advice (the functions to call).
    from appmult.flows import characterize
    with pytest.raises(ValueError, match=exact(
            f"{WIDE}; exact:width_a=13,width_b=13,signed=false is 13x13. Use characterize_metrics(...) or "
            "characterize(..., product=False) for streamed metrics only")):
        characterize("exact:width=13", progress=False, cache=False, cost=False)


@pytest.mark.parametrize("spec, name, size", [
    ("exact:width=13", "exact:width_a=13,width_b=13,signed=false", "13x13"),
    ("exact:width=16", "exact:width_a=16,width_b=16,signed=false", "16x16"),
    ("truncated:width_a=8,width_b=13,columns=4",
     "truncated:width_a=8,width_b=13,signed=false,columns=4,compensate=false", "8x13"),
])
def test_wide_spec_wrong(tmp_path, capsys, spec, name, size):
    advice = f"For this one's error metrics, run 'appmult characterize {spec} -o DIR' (metrics only above 12 bits)"
    capsys.readouterr()
    assert main(["retrain", "--spec", spec, "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert capsys.readouterr().err == error("retrain", f"{WIDE} and retraining needs one; {name} is {size}: use operands of at "
                                                f"most 12 bits. {advice}")
    assert main(["assign", "exact:width=4", spec, "--out", str(tmp_path / "a"), "--no-progress"]) == 2
    assert capsys.readouterr().err == error(
        "assign", f"{WIDE} and assignment needs one per candidate; {name} is {size}: use operands of at most "
                  f"12 bits. {advice}")
    assert not (tmp_path / "run").exists() and not (tmp_path / "a").exists()
