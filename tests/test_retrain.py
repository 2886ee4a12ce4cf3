"""Retraining workflow: pipeline and result files, resume, shared start, hybrid schedule,
half-window trials, simulated-error statistics against brute force, CLI errors."""

from __future__ import annotations

import json
import math
import re

import pytest
from conftest import exact

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from torch import nn  # noqa: E402

from appmult.cli import main  # noqa: E402
from appmult.nn import ApproxConfig, approximate_, calibrate  # noqa: E402
from appmult.methods.simulated_error import (SimulatedError, attach_simulated_error, lut_mre, noise_variance_conv2d, noise_variance_linear, product_noise_conv2d, product_noise_linear)  # noqa: E402
from appmult.flows import RESULTS_FORMAT, RetrainConfig, RetrainError, run_retrain, with_half_window  # noqa: E402
from appmult.lut_gen import LutFile  # noqa: E402
from appmult.train import MODEL_NAMES  # noqa: E402

SPEC = "truncated:width=6,signed=false,columns=4"



pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lut_path(tmp_path_factory):
    """A 6x6 truncated multiplier characterized from its gate netlist, with gradient tables."""
    pytest.importorskip("amaranth")
    from appmult.flows import characterize
    path = tmp_path_factory.mktemp("lut") / "trunc6.npz"
    characterize(SPEC, progress=False, cost=False).save(path)
    return path


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("pretrained")


def config(lut_path, pretrained_dir, out, **kw) -> RetrainConfig:
    base = dict(lut=str(lut_path), model="mlp", dataset="digits", epochs=2, pretrain_epochs=2,
                batch_size=64, grads=("ste",), out=str(out), progress=False,
                pretrained_dir=str(pretrained_dir), calib_batches=2, threads=1)
    base.update(kw)
    return RetrainConfig(**base)


def without_time(history):
    return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in history]


# --- the pipeline --------------------------------------------------------------------------------

def test_pipeline_writes_results(lut_path, pretrained_dir, tmp_path):
    out = tmp_path / "run"
    res = run_retrain(config(lut_path, pretrained_dir, out, grads=("ste", "lut2d", "lut1d")))
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    assert on_disk["format"] == RESULTS_FORMAT
    assert list(on_disk["modes"]) == ["ste", "lut2d", "lut1d"]
    assert on_disk["lut"]["spec"].startswith("truncated:width_a=6,width_b=6,signed=false,columns=4")
    assert on_disk["lut"]["sha256"].startswith(on_disk["lut"]["id"])
    assert set(on_disk["versions"]) >= {"python", "torch", "numpy", "appmult"}
    assert on_disk["config"]["seed"] == 0 and on_disk["seeds"]["seed"] == 0
    for key in ("exact_quantized_accuracy", "approx_accuracy"):
        assert 0.0 <= on_disk["start"][key] <= 1.0
    assert on_disk["timing"]["exact_quantized_epoch_s"] > 0
    for name, m in on_disk["modes"].items():
        assert [r["epoch"] for r in m["history"]] == [1, 2]
        assert m["epoch_time_s"] > 0 and 0 <= m["approx_after"] <= 1 and 0 <= m["exact_after"] <= 1
        # Every mode begins from the same quantized, calibrated model.
        assert m["approx_start"] == on_disk["start"]["approx_accuracy"]
        assert (out / "modes" / name / "last.pt").is_file()
    md = (out / "results.md").read_text().splitlines()
    table = [line for line in md if line.startswith("|")]
    assert table[0].startswith("| mode | exact-quantized acc (%) | approx before (%) | approx after (%)")
    assert [row.split("|")[1].strip() for row in table[2:]] == ["ste", "lut2d", "lut1d"]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The digits MLP learns: retraining from a 2-epoch FP32 start ends well above chance.
    assert on_disk["modes"]["ste"]["approx_after"] > 0.5


def test_resume_after_interruption_matches_uninterrupted(lut_path, pretrained_dir, tmp_path):
    kw = dict(grads=("ste", "lut1d"), epochs=2)
    reference = run_retrain(config(lut_path, pretrained_dir, tmp_path / "ref", **kw))

    class Interrupted(Exception):
        pass

    def crash(mode, epoch, record):
        if mode == "lut1d" and epoch == 1:
            raise Interrupted

    out = tmp_path / "crash"
    with pytest.raises(Interrupted):
        run_retrain(config(lut_path, pretrained_dir, out, **kw), on_epoch_end=crash)
    assert not (out / "results.json").exists()
    seen = []
    resumed = run_retrain(config(lut_path, pretrained_dir, out, resume=True, **kw),
                          on_epoch_end=lambda m, e, r: seen.append((m, e)))
    assert seen == [("lut1d", 2)]  # ste was complete, lut1d continues after epoch 1
    for mode in ("ste", "lut1d"):
        a, b = reference["modes"][mode], resumed["modes"][mode]
        assert without_time(a["history"]) == without_time(b["history"])
        assert a["approx_after"] == b["approx_after"] and a["exact_after"] == b["exact_after"]
        assert a["state_sha256"] == b["state_sha256"]


def test_resume_refuses_another_lut(lut_path, pretrained_dir, tmp_path):
    out = tmp_path / "run"
    run_retrain(config(lut_path, pretrained_dir, out, epochs=1))
    lut = LutFile.load(lut_path)
    other = LutFile(lut.product, width_a=6, width_b=6, signed=False, metadata={"spec": "other"})
    other_path = tmp_path / "other.npz"
    other.save(other_path)
    with pytest.raises(RetrainError, match=r"^.*modes/ste holds another run \(lut_sha256: '"):
        run_retrain(config(other_path, pretrained_dir, out, epochs=1, resume=True))


def test_exact_last_switches_to_exact_products(lut_path, pretrained_dir, tmp_path):
    res = run_retrain(config(lut_path, pretrained_dir, tmp_path, epochs=3, exact_last=1,
                             simulated_error=True, time_exact=False))
    ste = res["modes"]["ste"]["history"]
    assert [r["train_multiplication"] for r in ste] == ["approx", "approx", "exact"]
    assert [r["eval_multiplication"] for r in ste] == ["approx", "approx", "exact"]
    sim = res["modes"]["simulated-error"]["history"]
    assert [r["train_multiplication"] for r in sim] == ["exact+noise", "exact+noise", "exact"]
    # The last epoch was exact: its test accuracy is the exact-product accuracy of the result.
    assert ste[-1]["test_accuracy"] == res["modes"]["ste"]["exact_after"]
    assert res["modes"]["simulated-error"]["simulated_error"]["mre"] == pytest.approx(
        lut_mre(LutFile.load(lut_path)))
    # Approximate epoch times exclude the exact epochs.
    assert res["modes"]["ste"]["epoch_time_s"] == pytest.approx(
        sum(r["epoch_time_s"] for r in ste[:2]) / 2)


def test_half_window_auto_records_trials(lut_path, pretrained_dir, tmp_path):
    res = run_retrain(config(lut_path, pretrained_dir, tmp_path, epochs=1, grads=("lut2d",),
                             half_window="auto", trial_batches=2, time_exact=False))
    info = res["half_window_trials"]["lut2d"]
    # 6-bit operands: 2H+1 < 64 allows H = 1, 2, 4, 8, 16.
    assert [t["half_window"] for t in info["trials"]] == [1, 2, 4, 8, 16]
    assert info["trial_batches"] == 2
    best = min(info["trials"], key=lambda t: t["train_loss_after"])
    assert info["chosen"] == best["half_window"] == res["modes"]["lut2d"]["half_window"]
    assert all(math.isfinite(t["train_loss_after"]) for t in info["trials"])
    # The chosen tables are the ones trained with.
    want = with_half_window(LutFile.load(lut_path), info["chosen"]).lut_id
    assert res["modes"]["lut2d"]["lut_id"] == want


def test_explicit_half_window_changes_tables(lut_path):
    lut = LutFile.load(lut_path)
    a, b = with_half_window(lut, 1), with_half_window(lut, 4)
    assert a.lut_id != b.lut_id
    assert (a.product == lut.product).all()
    assert a.metadata["gradient_params"]["lut2d"]["half_window"] == 1
    with pytest.raises(ValueError, match="too large"):
        with_half_window(lut, 32)


def test_start_from_checkpoint(lut_path, pretrained_dir, tmp_path):
    from appmult.train.data import make_loaders
    from appmult.train.models import build_model
    torch.manual_seed(0)
    model = build_model("mlp", make_loaders("digits", 64).info)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    res = run_retrain(config(lut_path, pretrained_dir, tmp_path / "o", epochs=1,
                             checkpoint=str(tmp_path / "sd.pt"), time_exact=False))
    assert res["fp32"]["source"] == "checkpoint"


# --- configuration and CLI errors ------------------------------------------------------------------

@pytest.mark.parametrize("kw, message", [
    (dict(grads=("ste", "foo")), "Gradient mode must be one of 'ste', 'lut2d', 'lut1d', not 'foo'"),
    (dict(grads=("ste", "ste")), "Gradient modes repeat: ste ste"),
    (dict(grads=()), "Give at least one gradient mode (--grad ste lut2d lut1d) or --simulated-error"),
    (dict(exact_last=2), "exact_last must be an integer in 0..1 (at least one approximate epoch), not 2"),
    (dict(half_window=3), "Half window must be one of 1, 2, 4, 8, 16, 32, 64, 'auto' or 'stored', not 3"),
    (dict(model="vgg"), f"Model must be one of {', '.join(map(repr, MODEL_NAMES))}, not 'vgg'"),
    (dict(epochs=0), "epochs must be a positive integer, not 0"),
    (dict(spec="exact:width=4"), "Give exactly one of a LUT file (--lut) or a multiplier spec (--spec), not both"),
    (dict(mre=-0.1), "Simulated-error MRE must be a finite number >= 0, not -0.1"),
])
def test_config_wrong(lut_path, pretrained_dir, tmp_path, kw, message):
    with pytest.raises(RetrainError, match=exact(message)):
        config(lut_path, pretrained_dir, tmp_path, **kw)


def test_config_needs_a_multiplier():
    with pytest.raises(RetrainError, match=exact("Give exactly one of a LUT file (--lut) or a multiplier "
                                                 "spec (--spec), not neither")):
        RetrainConfig()


def run_cli(capsys, *args):
    rc = main(["retrain", *map(str, args)])
    return rc, capsys.readouterr().err


def test_cli_bad_grad_mode(lut_path, tmp_path, capsys):
    rc, err = run_cli(capsys, "--lut", lut_path, "--grad", "ste", "lut3d", "--out", tmp_path)
    assert rc == 2
    assert err == "appmult retrain: error: Gradient mode must be one of 'ste', 'lut2d', 'lut1d', not 'lut3d'\n"


def test_cli_lut_and_spec(lut_path, tmp_path, capsys):
    rc, err = run_cli(capsys, "--lut", lut_path, "--spec", SPEC, "--out", tmp_path)
    assert rc == 2
    assert err == ("appmult retrain: error: Give exactly one of a LUT file (--lut) or a multiplier spec "
                   "(--spec), not both\n")


def test_cli_missing_lut(tmp_path, capsys):
    rc, err = run_cli(capsys, "--lut", tmp_path / "nope.npz", "--out", tmp_path, "--no-progress")
    assert rc == 2
    assert err == f"appmult retrain: error: LUT file {tmp_path / 'nope.npz'} does not exist\n"


def test_cli_checkpoint_of_another_model(lut_path, pretrained_dir, tmp_path, capsys):
    # A pretrained MLP offered to a LeNet-5 run: refused before any training.
    from appmult.train import pretrain_fp32
    pre = pretrain_fp32("mlp", "digits", 2, 0, out_dir=pretrained_dir, batch_size=64, progress=False)
    rc, err = run_cli(capsys, "--lut", lut_path, "--model", "lenet5", "--checkpoint", pre.path,
                      "--out", tmp_path, "--no-progress")
    assert rc == 2
    assert err == (f"appmult retrain: error: Checkpoint {pre.path} holds a 'mlp' model for 'digits'; "
                   f"this run asks for 'lenet5' on 'digits'\n")


def test_cli_state_dict_that_does_not_fit(lut_path, tmp_path, capsys):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "sd.pt")
    rc, err = run_cli(capsys, "--lut", lut_path, "--model", "mlp", "--checkpoint", tmp_path / "sd.pt",
                      "--out", tmp_path, "--no-progress")
    assert rc == 2
    assert err.startswith(f"appmult retrain: error: Checkpoint {tmp_path / 'sd.pt'} does not fit model "
                          f"'mlp' for 'digits': ")


def test_cli_runs(lut_path, pretrained_dir, tmp_path, capsys):
    rc, err = run_cli(capsys, "--lut", lut_path, "--model", "mlp", "--epochs", 1, "--pretrain-epochs", 2,
                      "--grad", "lut1d", "--pretrained-dir", pretrained_dir, "--out", tmp_path,
                      "--calib-batches", 2, "--threads", 1, "--no-time-exact")
    assert rc == 0
    assert "[retrain] retraining: lut1d (1 epochs)" in err
    assert "| lut1d |" in err
    assert json.loads((tmp_path / "results.json").read_text())["config"]["grads"] == ["lut1d"]


# --- simulated error (Hammad et al.) ----------------------------------------------------------------

def empirical_var(draw, n: int) -> torch.Tensor:
    samples = torch.stack([draw() for _ in range(n)])
    return samples.var(0)


@pytest.mark.parametrize("distribution", ["uniform", "fixed"])
def test_linear_noise_variance_matches_brute_force(distribution):
    torch.manual_seed(0)
    qx = torch.randint(-8, 9, (3, 40)).double()
    qw = torch.randint(-8, 9, (5, 40)).double()
    sim = SimulatedError(0.1, distribution=distribution, method="exact")
    want = noise_variance_linear(qx, qw, sim)
    # Brute force, written out independently: draw s_k e_k per product, sum, repeat.
    n = 4000

    def brute():
        rel = sim.sample_relative((3, 5, 40), dtype=torch.float64)
        return (qx[:, None, :] * qw[None, :, :] * rel).sum(-1)
    got = empirical_var(brute, n)
    # Variance estimate has relative sd sqrt(2/n) ~ 2.2%: 10% is a 4.5-sigma band.
    assert torch.allclose(got, want, rtol=0.1)
    assert torch.allclose(empirical_var(lambda: product_noise_linear(qx, qw, sim), n), want, rtol=0.1)
    gauss = SimulatedError(0.1, distribution=distribution, method="gaussian")
    assert torch.allclose(empirical_var(lambda: product_noise_linear(qx, qw, gauss), n), want, rtol=0.1)
    assert sim.second_moment == pytest.approx(0.01 * (4 / 3 if distribution == "uniform" else 1))


@pytest.mark.parametrize("k", [16, 64])
def test_noise_is_per_product_not_per_output(k):
    # K equal positive products p: y = K p. Per-product noise has sd p*rms(e)*sqrt(K) = |y|*rms(e)/sqrt(K);
    # per-output noise y*(1+s e) would have sd |y|*rms(e), sqrt(K) times more.
    torch.manual_seed(1)
    sim = SimulatedError(0.1, method="exact")
    qx = torch.full((1, k), 3.0, dtype=torch.float64)
    qw = torch.full((200, k), 5.0, dtype=torch.float64)
    y = 15.0 * k
    noise = product_noise_linear(qx, qw, sim)
    sd = noise.std().item()
    rms_e = math.sqrt(sim.second_moment)
    assert sd == pytest.approx(y * rms_e / math.sqrt(k), rel=0.15)
    assert sd < 0.3 * y * rms_e


def test_conv_noise_matches_unfolded_brute_force():
    torch.manual_seed(2)
    qx = torch.randint(0, 16, (2, 3, 6, 6)).double()
    qw = torch.randint(0, 16, (4, 3, 3, 3)).double()
    sim = SimulatedError(0.2, method="exact")
    want = noise_variance_conv2d(qx, qw, sim, stride=2)
    # Brute-force per output position, independent of unfold: sum over the receptive field.
    brute = torch.zeros_like(want)
    for i in range(want.shape[2]):
        for j in range(want.shape[3]):
            patch = qx[:, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3]
            brute[:, :, i, j] = ((patch[:, None] * qw[None]) ** 2).sum((2, 3, 4)) * sim.second_moment
    assert torch.allclose(want, brute)
    got = empirical_var(lambda: product_noise_conv2d(qx, qw, sim, stride=2), 3000)
    assert torch.allclose(got, want, rtol=0.12)
    # Grouped convolutions are sampled exactly too (against brute force in test_grouped_conv.py).
    assert product_noise_conv2d(qx[:, :2], qw[:, :1], sim, groups=2).shape == (2, 4, 4, 4)


def test_hooks_add_noise_in_training_only(lut_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    approximate_(model, ApproxConfig(str(lut_path)))
    x = torch.randn(8, 1, 8, 8)
    calibrate(model, [x])
    model.eval()
    clean = model(x)
    hooks = attach_simulated_error(model, SimulatedError(0.1))
    assert torch.equal(model(x), clean)          # evaluation: untouched
    model.train()
    for m in model.modules():
        if hasattr(m, "act_quant"):
            m.act_quant.observing = False          # same ranges, so only the noise differs
    noisy = model(x)
    assert hooks.noisy_forwards == 2 and not torch.equal(noisy, clean)
    hooks.enabled = False
    assert torch.equal(model(x), clean)
    hooks.remove()
    hooks.enabled = True
    assert torch.equal(model(x), clean)


def test_simulated_error_wrong():
    with pytest.raises(ValueError, match=exact("Simulated-error distribution must be one of 'uniform', "
                                               "'fixed', not 'normal'")):
        SimulatedError(0.1, distribution="normal")
    with pytest.raises(ValueError, match=exact("Simulated-error MRE must be a finite number >= 0, not nan")):
        SimulatedError(float("nan"))
    with pytest.raises(ValueError, match=exact("Model has no approximate layers to add simulated error to; "
                                               "convert it with approximate_ first")):
        attach_simulated_error(nn.Linear(2, 2), SimulatedError(0.1))


def test_lut_mre_recorded_and_computed(lut_path):
    lut = LutFile.load(lut_path)
    bare = LutFile(lut.product, width_a=6, width_b=6, signed=False)
    assert lut_mre(bare) == pytest.approx(lut.metadata["metrics"]["mre"], rel=1e-9)


def test_value_products_carry_less_noise_than_codes(lut_path):
    # Unsigned quantization: code products include the zero points, so relative noise on them
    # is larger than on the zero-point-corrected values x*w.
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(32, 16))
    approximate_(model, ApproxConfig(str(lut_path)))
    x = torch.randn(64, 32)
    calibrate(model, [x])
    model.eval()
    clean = model(x)
    model.train()
    model[0].act_quant.observing = False
    spread = {}
    for operands in ("codes", "values"):
        hooks = attach_simulated_error(model, SimulatedError(0.1), operands=operands)
        spread[operands] = (model(x) - clean).std().item()
        hooks.remove()
    assert 0 < spread["values"] < 0.7 * spread["codes"]
    with pytest.raises(ValueError, match=exact("Simulated-error operands must be 'codes' or 'values', not 'bits'")):
        attach_simulated_error(model, SimulatedError(0.1), operands="bits")


def test_resume_refuses_other_data(lut_path, pretrained_dir, tmp_path, monkeypatch):
    # Only the data set's name was recorded: a resume on another data_dir (or changed files) trained
    # epoch 1 on one data set and epoch 2 on the other, and reported the second.
    import appmult.flows.retrain as retrain_flow
    out = tmp_path / "run"
    run_retrain(config(lut_path, pretrained_dir, out, epochs=1))
    real = retrain_flow.make_loaders

    def other_data(*args, **kwargs):
        loaders = real(*args, **kwargs)
        loaders.test.dataset.labels[0] = (loaders.test.dataset.labels[0] + 1) % 10
        return loaders

    monkeypatch.setattr(retrain_flow, "make_loaders", other_data)
    with pytest.raises(RetrainError, match=r"^.*modes/ste holds another run \(data_sha256: '[0-9a-f]{64}' != "
                                           r"'[0-9a-f]{64}'\)"):
        run_retrain(config(lut_path, pretrained_dir, out, epochs=1, resume=True))


def test_resume_refuses_a_checkpoint_without_its_run_description(lut_path, pretrained_dir, tmp_path):
    # A last.pt alone (copied, or its run.json deleted) was resumed under any settings.
    out = tmp_path / "run"
    run_retrain(config(lut_path, pretrained_dir, out, epochs=1))
    (out / "modes" / "ste" / "run.json").unlink()
    with pytest.raises(RetrainError, match=re.escape(
            f"{out / 'modes' / 'ste'} holds a checkpoint (last.pt) but no run.json, so which settings made it cannot "
            "be checked; replace the run with --overwrite instead of --resume, or use another --out")):
        run_retrain(config(lut_path, pretrained_dir, out, epochs=1, lr=0.01, resume=True))


def test_resume_with_other_settings_is_refused_before_any_work(lut_path, pretrained_dir, tmp_path, monkeypatch):
    # A resume with another learning rate (or seed, epochs, ...) was refused only where the mode
    # started: after the FP32 pretraining (the cache is keyed on lr, so a changed lr pretrained
    # afresh), the calibration and the half-window trials.
    import appmult.flows.retrain as retrain_flow
    out = tmp_path / "run"
    run_retrain(config(lut_path, pretrained_dir, out, epochs=1))

    def no_work(*args, **kwargs):
        raise AssertionError("the FP32 step ran before the resume was refused")

    monkeypatch.setattr(retrain_flow, "_fp32_step", no_work)
    monkeypatch.setattr(retrain_flow, "make_loaders", no_work)
    with pytest.raises(RetrainError, match=re.escape(
            f"{out / 'modes' / 'ste'} holds another run (lr: 0.001 != 0.01); use another --out, or replace it "
            "with --overwrite instead of --resume")):
        run_retrain(config(lut_path, pretrained_dir, out, epochs=1, lr=0.01, resume=True))
    with pytest.raises(RetrainError, match=re.escape("holds another run (seed: 0 != 1)")):
        run_retrain(config(lut_path, pretrained_dir, out, epochs=1, seed=1, resume=True))
    (out / "modes" / "ste" / "run.json").unlink()
    with pytest.raises(RetrainError, match=re.escape("holds a checkpoint (last.pt) but no run.json")):
        run_retrain(config(lut_path, pretrained_dir, out, epochs=1, resume=True))


def test_resume_on_other_threads_is_warned_and_recorded(lut_path, pretrained_dir, tmp_path):
    # torch's float sums depend on the thread count (a 1-epoch mlp run on 1 and on 2 threads ends in
    # different weights), so a run resumed with other threads equals neither uninterrupted run. That
    # happened without a word, and results.json named only the last thread count.
    class Interrupted(Exception):
        pass

    def crash(mode, epoch, record):
        raise Interrupted

    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        run_retrain(config(lut_path, pretrained_dir, out, threads=1), on_epoch_end=crash)
    with pytest.warns(RuntimeWarning, match=re.escape(
            f"{out / 'modes' / 'ste'} resumes after epoch 1 with threads 1 -> 2: float sums may round differently there, "
            "so the result can differ in its last bits from an uninterrupted run (each epoch's platform is in its "
            "history); to match, resume as epoch 1 ran (--threads 1 on cpu)")):
        resumed = run_retrain(config(lut_path, pretrained_dir, out, threads=2, resume=True))
    history = resumed["modes"]["ste"]["history"]
    assert [(r["epoch"], r["threads"], r["device"], r["world_size"]) for r in history] == \
        [(1, 1, "cpu", 1), (2, 2, "cpu", 1)]
    # Resumed as it started: no warning.
    out2 = tmp_path / "run2"
    with pytest.raises(Interrupted):
        run_retrain(config(lut_path, pretrained_dir, out2, threads=1), on_epoch_end=crash)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        again = run_retrain(config(lut_path, pretrained_dir, out2, threads=1, resume=True))
    assert [r["threads"] for r in again["modes"]["ste"]["history"]] == [1, 1]


def test_resume_refuses_a_checkpoint_of_another_mode(lut_path, pretrained_dir, tmp_path):
    # run.json and last.pt were checked apart: a last.pt copied from the lut1d directory into the ste
    # one (whose run.json it kept) was resumed as the ste run.
    from appmult.train import CheckpointError
    out = tmp_path / "run"
    run_retrain(config(lut_path, pretrained_dir, out, epochs=1, grads=("ste", "lut1d")))
    (out / "modes" / "ste" / "last.pt").write_bytes((out / "modes" / "lut1d" / "last.pt").read_bytes())
    with pytest.raises(CheckpointError, match=re.escape(
            f"Checkpoint {out / 'modes' / 'ste' / 'last.pt'} belongs to another run (mode: 'lut1d' != 'ste'")):
        run_retrain(config(lut_path, pretrained_dir, out, epochs=1, grads=("ste", "lut1d"), resume=True))
