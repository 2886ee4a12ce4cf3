"""Training loop: learning, LR schedule, resume equivalence, atomic and safe checkpoints."""

from __future__ import annotations

import json

import re

import pytest
from conftest import exact

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import appmult.train.training as training  # noqa: E402
from appmult.train.data import make_loaders  # noqa: E402
from appmult.train.models import build_model  # noqa: E402
from appmult.train import (CHECKPOINT_NAME, CheckpointError, Metrics, default_milestones, deterministic_algorithms, evaluate, fit, load_checkpoint, load_pretrained, plot_history, pretrain_fp32, seed_everything)  # noqa: E402



pytestmark = pytest.mark.usefixtures("one_torch_thread")


def digits_run(model_name: str = "mlp", init_seed: int = 0, batch_size: int = 32):
    loaders = make_loaders("digits", batch_size, seed=0)
    seed_everything(init_seed)
    return build_model(model_name, loaders.info), loaders


def without_time(history):
    return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in history]


def test_fit_learns_digits():
    # Measured: MLP, 2 epochs, batch 32 -> 87.5..93% test accuracy over seeds 0..5
    # (chance is 10%); 75% leaves a wide margin.
    model, loaders = digits_run("mlp")
    history = fit(model, loaders, 2, progress=False)
    assert [r["epoch"] for r in history] == [1, 2]
    assert set(history[0]) == {"epoch", "lr", "train_loss", "train_accuracy", "test_loss",
                               "test_accuracy", "epoch_time_s"}
    assert history[-1]["test_accuracy"] > 0.75
    assert history[1]["train_loss"] < history[0]["train_loss"]
    assert [r["lr"] for r in history] == [1e-3, 5e-4]  # halved after epoch 1 of 2
    assert evaluate(model, loaders.test).accuracy == history[-1]["test_accuracy"]


def test_default_milestones():
    assert default_milestones(30) == [10, 20]  # the published recipe
    assert default_milestones(3) == [1, 2]
    assert default_milestones(2) == [1]
    assert default_milestones(1) == []


def test_fit_schedule():
    model, loaders = digits_run("mlp")
    small = DataLoader(TensorDataset(*[t[:64] for t in loaders.train.dataset.tensors()]),
                       batch_size=32)
    history = fit(model, (small, None), 6, lr=0.01, progress=False)
    assert [r["lr"] for r in history] == pytest.approx([0.01, 0.01, 0.005, 0.005, 0.0025,
                                                        0.0025])
    assert history[0]["test_accuracy"] is None


def test_evaluate_restores_mode():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
        model[1].bias.zero_()
    x = torch.tensor([[2.0, 1, 0, 0], [0, 3, 0, 0], [5, 0, 0, 0]])
    y = torch.tensor([0, 1, 1])
    model.train()
    result = evaluate(model, DataLoader(TensorDataset(x, y), batch_size=2))
    assert isinstance(result, Metrics) and result.accuracy == pytest.approx(2 / 3)
    expected = nn.functional.cross_entropy(model(x), y).item()
    assert result.loss == pytest.approx(expected)
    assert model.training


def test_resume_equals_uninterrupted(tmp_path):
    model, loaders = digits_run("lenet5", batch_size=64)
    straight = fit(model, loaders, 3, seed=7, progress=False)
    after_straight = torch.rand(3)  # the RNG stream after fit, too

    class Crash(Exception):
        pass

    def crash_after_2(epoch, record):
        if epoch == 2:
            raise Crash

    model_a, loaders_a = digits_run("lenet5", batch_size=64)
    with pytest.raises(Crash):
        fit(model_a, loaders_a, 3, seed=7, checkpoint_dir=tmp_path, progress=False,
            on_epoch_end=crash_after_2)
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["epoch"] == 2

    # A fresh process would rebuild everything: other initial weights, new loaders,
    # a disturbed global RNG.
    model_b, loaders_b = digits_run("lenet5", init_seed=123, batch_size=64)
    torch.rand(10)
    epochs_run = []
    resumed = fit(model_b, loaders_b, 3, seed=7, checkpoint_dir=tmp_path, progress=False,
                  on_epoch_end=lambda epoch, record: epochs_run.append(epoch))
    assert epochs_run == [3]
    assert torch.equal(torch.rand(3), after_straight)
    assert without_time(resumed) == without_time(straight)
    for key, value in model.state_dict().items():
        assert torch.equal(model_b.state_dict()[key], value), key


def test_resume_finished_run(tmp_path):
    model, loaders = digits_run("mlp")
    history = fit(model, loaders, 2, checkpoint_dir=tmp_path, progress=False)
    again, loaders = digits_run("mlp", init_seed=5)
    epochs_run = []
    assert fit(again, loaders, 2, checkpoint_dir=tmp_path, progress=False,
               on_epoch_end=lambda e, r: epochs_run.append(e)) == history
    assert epochs_run == []
    assert torch.equal(again.layers[1].weight, model.layers[1].weight)


def test_resume_false_starts_over(tmp_path):
    model, loaders = digits_run("mlp")
    fit(model, loaders, 2, checkpoint_dir=tmp_path, progress=False)
    model, loaders = digits_run("mlp")
    history = fit(model, loaders, 1, checkpoint_dir=tmp_path, resume=False, progress=False)
    assert len(history) == 1 and load_checkpoint(tmp_path / CHECKPOINT_NAME)["epoch"] == 1


def test_resume_other_run_wrong(tmp_path):
    model, loaders = digits_run("mlp")
    fit(model, loaders, 1, seed=1, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match=exact(
            f"Checkpoint {tmp_path / CHECKPOINT_NAME} belongs to another run "
            f"(seed: 1 != 2); pass resume=False or use another checkpoint_dir")):
        fit(model, loaders, 1, seed=2, checkpoint_dir=tmp_path, progress=False)


def test_resume_other_identity_wrong(tmp_path):
    # A caller's identity (its settings, content hashes) is sealed into the checkpoint: a last.pt
    # copied between runs whose own seed and schedule agree is no longer resumed.
    model, loaders = digits_run("mlp")
    fit(model, loaders, 1, checkpoint_dir=tmp_path, progress=False, milestones=(), identity={"mode": "lut1d", "lr": 0.01})
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["run"]["identity"] == {"mode": "lut1d", "lr": 0.01}
    with pytest.raises(CheckpointError, match=exact(
            f"Checkpoint {tmp_path / CHECKPOINT_NAME} belongs to another run "
            f"(mode: 'lut1d' != 'ste'); pass resume=False or use another checkpoint_dir")):
        fit(model, loaders, 2, checkpoint_dir=tmp_path, progress=False, milestones=(), identity={"mode": "ste", "lr": 0.01})
    with pytest.raises(CheckpointError, match=re.escape("(mode: 'lut1d' != None; lr: 0.01 != None)")):
        fit(model, loaders, 2, checkpoint_dir=tmp_path, progress=False, milestones=())
    # The same identity resumes (tuples compare as the lists they are stored as).
    history = fit(model, loaders, 2, checkpoint_dir=tmp_path, progress=False, milestones=(), identity={"lr": 0.01, "mode": "lut1d"})
    assert [r["epoch"] for r in history] == [1, 2]


def test_resume_checkpoint_without_identity(tmp_path):
    # Checkpoints written before identities (or by callers without one) resume on the rest.
    model, loaders = digits_run("mlp")
    fit(model, loaders, 1, checkpoint_dir=tmp_path, progress=False, milestones=())
    history = fit(model, loaders, 2, checkpoint_dir=tmp_path, progress=False, milestones=(), identity={"milestones": (1, 2)})
    assert [r["epoch"] for r in history] == [1, 2]
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["run"]["identity"] == {"milestones": [1, 2]}


def test_on_epoch_end_stops(tmp_path):
    model, loaders = digits_run("mlp")
    history = fit(model, loaders, 3, checkpoint_dir=tmp_path, progress=False,
                  on_epoch_end=lambda epoch, record: True)
    assert len(history) == 1
    assert json.loads((tmp_path / "history.json").read_text()) == history


def test_checkpoint_files_and_atomicity(tmp_path, monkeypatch):
    model, loaders = digits_run("mlp")
    fit(model, loaders, 2, checkpoint_dir=tmp_path, progress=False,
        on_epoch_end=lambda epoch, record: True)  # stop after epoch 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.json", CHECKPOINT_NAME]
    before = (tmp_path / CHECKPOINT_NAME).read_bytes()

    # A crash while the next checkpoint is being written leaves the old one intact.
    real_save = torch.save

    def save_half_then_die(obj, f, *args, **kwargs):
        real_save({"partial": torch.zeros(3)}, f)
        raise KeyboardInterrupt

    monkeypatch.setattr(training.torch, "save", save_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        fit(model, loaders, 2, checkpoint_dir=tmp_path, progress=False)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.json", CHECKPOINT_NAME]
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == before
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["epoch"] == 1


def test_checkpoint_is_weights_only(tmp_path):
    model, loaders = digits_run("mlp")
    fit(model, loaders, 1, checkpoint_dir=tmp_path, progress=False)
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert set(state) == {"format", "epoch", "run", "model", "optimizer", "scheduler", "rng",
                          "history"}


def test_corrupt_checkpoint_wrong(tmp_path):
    path = tmp_path / CHECKPOINT_NAME
    path.write_bytes(b"not a checkpoint at all")
    model, loaders = digits_run("mlp")
    with pytest.raises(CheckpointError, match=exact(
            f"Checkpoint {path} is corrupt or not a torch file; delete it or pass "
            f"resume=False")):
        fit(model, loaders, 1, checkpoint_dir=tmp_path, progress=False)
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match=exact(
            f"{path} is not an appmult training checkpoint; delete it or pass resume=False")):
        load_checkpoint(path)


def test_hostile_checkpoint_wrong(tmp_path):
    # A checkpoint whose pickle would call a function: weights_only refuses it.
    class Hostile:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / CHECKPOINT_NAME
    torch.save({"format": "appmult.training.checkpoint/1", "x": Hostile()}, path)
    with pytest.raises(CheckpointError, match=exact(
            f"Checkpoint {path} is corrupt or not a torch file; delete it or pass "
            f"resume=False")):
        load_checkpoint(path)


def test_fit_wrong():
    model, loaders = digits_run("mlp")
    with pytest.raises(TypeError, match=exact("Epoch count must be a positive integer, not 0")):
        fit(model, loaders, 0)


def test_seed_everything_wrong():
    with pytest.raises(TypeError, match=exact("Seed must be a non-negative integer, not -1")):
        seed_everything(-1)


def test_deterministic_algorithms_restores():
    before = torch.are_deterministic_algorithms_enabled()
    with deterministic_algorithms():
        assert torch.are_deterministic_algorithms_enabled()
    assert torch.are_deterministic_algorithms_enabled() == before


def test_plot_history(tmp_path):
    history = [{"epoch": e, "train_loss": 1 / e, "test_loss": 1.1 / e, "train_accuracy": 0.5,
                "test_accuracy": None if e == 2 else 0.4} for e in (1, 2, 3)]
    path = plot_history({"ste": history, "lut2d": history}, tmp_path / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png"]


def test_plot_history_wrong(tmp_path):
    with pytest.raises(ValueError, match=exact("Nothing to plot: histories is empty")):
        plot_history({}, tmp_path / "x.png")


def test_pretrain_fp32_caches(tmp_path, monkeypatch):
    first = pretrain_fp32("mlp", "digits", 1, seed=0, out_dir=tmp_path, progress=False)
    from appmult.train import data_digest, make_loaders
    stem = f"mlp-digits-{data_digest(make_loaders('digits', 64, 0))[:12]}-e1-bs64-lr0.001-s0"
    assert first.path == tmp_path / f"{stem}.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{stem}.json", f"{stem}.png",
                                                          f"{stem}.pt"]

    def no_training(*args, **kwargs):
        raise AssertionError("cached model retrained")

    monkeypatch.setattr(training, "fit", no_training)
    second = pretrain_fp32("mlp", "digits", 1, seed=0, out_dir=tmp_path, progress=False)
    assert second.history == first.history
    for key, value in first.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[key], value)
    assert load_pretrained(first.path).history == first.history


def test_load_pretrained_wrong(tmp_path):
    path = tmp_path / "x.pt"
    path.write_bytes(b"\0" * 10)
    with pytest.raises(CheckpointError, match=exact(
            f"Pretrained model {path} is corrupt or not a torch file; delete it to retrain")):
        load_pretrained(path)


def test_pretrain_fp32_cache_follows_the_data(tmp_path, monkeypatch):
    # The cache name held the data set's name only: a data_dir of other files reused this model.
    import appmult.train.pretraining as pretraining
    real = pretraining.make_loaders
    first = pretrain_fp32("mlp", "digits", 1, seed=0, out_dir=tmp_path, progress=False)

    def other_data(*args, **kwargs):  # the same name, other content: one label changed
        loaders = real(*args, **kwargs)
        loaders.train.dataset.labels[0] = (loaders.train.dataset.labels[0] + 1) % 10
        return loaders

    monkeypatch.setattr(pretraining, "make_loaders", other_data)
    second = pretrain_fp32("mlp", "digits", 1, seed=0, out_dir=tmp_path, progress=False)
    assert second.path != first.path and second.path.exists() and first.path.exists()
