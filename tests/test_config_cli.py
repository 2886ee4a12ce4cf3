"""The config dataclasses are the one home of the defaults: the CLI reads them, and
``AssignConfig`` validates every field on construction, like ``RetrainConfig``."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import exact

from appmult.cli import build_parser, main
from appmult.cli._config import add_option, build_config
from appmult.flows import AssignConfig, RetrainConfig

torch = pytest.importorskip("torch")  # building a config looks its names up in train/nn/methods

from appmult.methods import AssignError  # noqa: E402
from appmult.flows import RetrainError  # noqa: E402
from appmult.train import MODEL_NAMES  # noqa: E402

#: AssignConfig fields with no command-line option.
ASSIGN_NOT_ON_CLI = {"calib_batches", "stats_batches"}


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


# --- the CLI's defaults are the dataclasses' ------------------------------------------------------

def test_retrain_cli_defaults():
    args = parse("retrain", "--lut", "m.npz")
    for f in dataclasses.fields(RetrainConfig):
        expected = "m.npz" if f.name == "lut" else f.default
        assert getattr(args, f.name) == expected, f.name
    assert build_config(RetrainConfig, args) == RetrainConfig(lut="m.npz")


def test_assign_cli_defaults():
    args = parse("assign", "truncated:width=8,signed=false,columns=6")
    assert args.candidates == ["truncated:width=8,signed=false,columns=6"]
    for f in dataclasses.fields(AssignConfig):
        if f.name == "candidates":
            continue
        if f.name in ASSIGN_NOT_ON_CLI:
            assert not hasattr(args, f.name), f.name
            continue
        assert getattr(args, f.name) == f.default, f.name
    assert build_config(AssignConfig, args) == AssignConfig(candidates=("truncated:width=8,signed=false,columns=6",))


def test_explore_network_cli_defaults():
    from appmult.flows.explore_config import NetworkExploreConfig
    args = parse("explore", "-o", "run", "--model", "lenet5")
    on_cli = ("dataset", "target_accuracy", "max_drop", "pretrain_epochs", "epochs", "grad", "shortlist",
              "family_shortlist", "neighbours")
    from appmult.cli.explore import _NETWORK_FIELDS, network_values
    assert set(on_cli) == set(_NETWORK_FIELDS)
    defaults = {f.name: f.default for f in dataclasses.fields(NetworkExploreConfig)}
    for name in on_cli:  # None on the command line (so that one given without --model can be refused) ...
        assert getattr(args, name) is None, name
    assert network_values(args) == {name: defaults[name] for name in on_cli}  # ... the config's default in the run
    args = parse("explore", "-o", "run", "--model", "lenet5", "--neighbours", "0", "--shortlist", "5")
    assert network_values(args) == {**{name: defaults[name] for name in on_cli}, "neighbours": 0, "shortlist": 5}


def test_cli_flags_reach_the_config():
    args = parse("retrain", "--spec", "exact:width=4", "--grad", "ste", "lut2d", "--half-window", "4",
                 "--no-progress", "--no-time-exact", "--resume", "--epochs", "4", "--exact-last", "1")
    cfg = build_config(RetrainConfig, args)
    assert (cfg.spec, cfg.grads, cfg.half_window, cfg.progress, cfg.time_exact, cfg.resume, cfg.epochs,
            cfg.exact_last) == ("exact:width=4", ("ste", "lut2d"), 4, False, False, True, 4, 1)
    cfg = build_config(AssignConfig, parse("assign", "a", "b", "--no-exact", "--no-homogeneous", "--no-validate",
                                           "--lam", "0.1", "--no-progress"))
    assert (cfg.candidates, cfg.include_exact, cfg.homogeneous, cfg.validate, cfg.lam, cfg.progress) == \
        (("a", "b"), False, False, False, 0.1, False)


def test_cli_help_shows_the_dataclass_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["retrain", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default ste)" in out and "(default retrain-out)" in out and "(default 0.001)" in out


def test_cli_help_does_not_import_torch():
    # The command line reads the defaults from the config modules, which must stay light.
    code = ("import sys; from appmult.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'amaranth') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_add_option_wrong():
    import argparse
    p = argparse.ArgumentParser()
    with pytest.raises(TypeError, match=exact("--resume (store_false) cannot change RetrainConfig.resume, "
                                              "whose default is False")):
        add_option(p, RetrainConfig, "resume", "--resume", action="store_false")
    with pytest.raises(TypeError, match=exact("RetrainConfig has no field 'nope'")):
        add_option(p, RetrainConfig, "nope", "--nope")
    with pytest.raises(TypeError, match=exact("AssignConfig.candidates has no default")):
        add_option(p, AssignConfig, "candidates", "--candidates")


# --- AssignConfig: frozen, validated -----------------------------------------------------------------

def test_assign_config_frozen():
    cfg = AssignConfig(candidates=["a"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lam = 1.0
    assert hash(cfg) == hash(AssignConfig(candidates=("a",)))


def test_assign_config(tmp_path):
    import numpy as np
    cfg = AssignConfig(candidates=[tmp_path / "m.npz", "exact:width=8"], dataset="mnist", data_dir=tmp_path,
                       checkpoint=None,
                       out=Path("o"), pretrain_epochs=np.int64(2), retrain_epochs=0, seed=0, lam=0.0,
                       lr=1, include_exact=False)
    assert cfg.candidates == (str(tmp_path / "m.npz"), "exact:width=8")
    assert (cfg.data_dir, cfg.out, cfg.retrain_epochs, cfg.lam) == (str(tmp_path), "o", 0, 0.0)


@pytest.mark.parametrize("kw, message", [
    (dict(candidates=()), "Give at least one candidate multiplier (spec or LUT file)"),
    (dict(candidates="exact:width=8"), "candidates must be a list or tuple of specs or LUT files, "
                                       "not 'exact:width=8'"),
    (dict(candidates=None), "candidates must be a list or tuple of specs or LUT files, not None"),
    (dict(candidates=("a", 3)), "Each candidate must be a spec or a LUT file path, not 3"),
    (dict(candidates=("a", "")), "Each candidate must be a spec or a LUT file path, not ''"),
    (dict(model="vgg"), f"Model must be one of {', '.join(map(repr, MODEL_NAMES))}, not 'vgg'"),
    (dict(dataset="imagenet"), "Dataset must be one of 'digits', 'mnist5k', 'mnist', 'cifar10', 'cifar100', not 'imagenet'"),
    (dict(data_dir=3), "data_dir must be a path or None, not 3"),
    (dict(checkpoint=b"x.pt"), "checkpoint must be a path or None, not b'x.pt'"),
    (dict(pretrain_epochs=0), "pretrain_epochs must be a positive integer, not 0"),
    (dict(batch_size=2.0), "batch_size must be a positive integer, not 2.0"),
    (dict(lr=0.0), "lr must be a positive number, not 0.0"),
    (dict(seed=-1), "seed must be a non-negative integer, not -1"),
    (dict(surrogate_epochs=True), "surrogate_epochs must be a positive integer, not True"),
    (dict(sigma_lr=math.nan), "sigma_lr must be a positive number, not nan"),
    (dict(lam=-0.5), "lam must be a finite non-negative number, not -0.5"),
    (dict(lam=math.inf), "lam must be a finite non-negative number, not inf"),
    (dict(sigma_max=0), "sigma_max must be a positive number, not 0"),
    (dict(retrain_epochs=-1), "retrain_epochs must be a non-negative integer, not -1"),
    (dict(calib_batches=0), "calib_batches must be a positive integer, not 0"),
    (dict(stats_batches=None), "stats_batches must be a positive integer, not None"),
    (dict(error_model="local"), "Error model must be 'population' or 'global', not 'local'"),
    (dict(cost_figure="area"), "Cost figure must be one of gates, aig_nodes, depth, depth_with_not, transistors, "
                               "ice40_lut4, ice40_carry, toggles_per_op, weighted_toggles_per_op, not 'area'"),
    (dict(include_exact=1), "include_exact must be a bool, not 1"),
    (dict(homogeneous="yes"), "homogeneous must be a bool, not 'yes'"),
    (dict(validate=None), "validate must be a bool, not None"),
    (dict(out=None), "out must be a path, not None"),
    (dict(progress=0), "progress must be a bool, not 0"),
    (dict(overwrite="no"), "overwrite must be a bool, not 'no'"),
])
def test_assign_config_wrong(kw, message):
    kw = {"candidates": ("a",), **kw}
    with pytest.raises(AssignError, match=exact(message)):
        AssignConfig(**kw)


def test_assign_config_fields_all_checked():
    # Every field of AssignConfig has a wrong value above (the test names the field).
    checked = {"candidates", "model", "dataset", "data_dir", "checkpoint", "pretrain_epochs", "batch_size", "lr",
               "seed", "surrogate_epochs", "sigma_lr", "lam", "sigma_max", "retrain_epochs", "calib_batches",
               "stats_batches", "error_model", "cost_figure", "include_exact", "homogeneous", "validate", "out",
               "overwrite", "progress"}
    assert {f.name for f in dataclasses.fields(AssignConfig)} == checked


def test_cli_assign_wrong(capsys):
    assert main(["assign", "a", "--lam", "-1"]) == 2
    assert capsys.readouterr().err == "appmult assign: error: lam must be a finite non-negative number, not -1.0\n"


# --- RetrainConfig: the fields it now checks too -------------------------------------------------------

def test_retrain_config(tmp_path):
    cfg = RetrainConfig(lut=tmp_path / "m.npz", out=tmp_path, progress=False, resume=True, threads=2)
    assert (cfg.lut, cfg.out, cfg.progress, cfg.resume, cfg.threads) == \
        (str(tmp_path / "m.npz"), str(tmp_path), False, True, 2)


@pytest.mark.parametrize("kw, message", [
    (dict(lut=3), "lut must be a path or None, not 3"),
    (dict(lut=None, spec=3), "spec must be a spec string or None, not 3"),
    (dict(out=None), "out must be a path, not None"),
    (dict(dataset="imagenet"), "Dataset must be one of 'digits', 'mnist5k', 'mnist', 'cifar10', 'cifar100', not 'imagenet'"),
    (dict(lr=-1), "lr must be a positive number, not -1"),
    (dict(trial_batches=0), "trial_batches must be a positive integer or None, not 0"),
    (dict(threads=0), "threads must be a positive integer, not 0"),
    (dict(resume=1), "resume must be a bool, not 1"),
    (dict(simulated_error="no"), "simulated_error must be a bool, not 'no'"),
    (dict(progress=None), "progress must be a bool, not None"),
    (dict(time_exact=0), "time_exact must be a bool, not 0"),
    (dict(rtl_positions=0), "rtl_positions must be a positive integer, not 0"),
    (dict(rtl_sim="vcs"), "rtl_sim must be 'icarus' or 'verilator', not 'vcs'"),
    (dict(noise_operands="both"), "Noise operands must be 'codes' or 'values', not 'both'"),
])
def test_retrain_config_wrong(kw, message):
    kw = {"lut": "m.npz", **kw}
    with pytest.raises(RetrainError, match=exact(message)):
        RetrainConfig(**kw)
