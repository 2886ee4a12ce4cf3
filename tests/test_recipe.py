"""The published retraining protocol as a recipe (``appmult retrain --recipe date25``): every
setting it makes, recorded in results.json; explicit values win flag by flag; its refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import exact

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from appmult.cli import build_parser  # noqa: E402
from appmult.cli._config import build_config  # noqa: E402
from appmult.flows import RECIPES, RetrainConfig, RetrainError, run_retrain  # noqa: E402
from appmult.lut_gen import LutFile  # noqa: E402
from appmult.train import ImageDataset, DATASETS, make_loaders  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WIDTH, COLUMNS = 6, 4


def truncated_product(width: int, columns: int, signed: bool = False) -> np.ndarray:
    """Unsigned array multiplier without the partial-product bits of the ``columns`` lowest columns."""
    a = np.arange(1 << width)[:, None]
    b = np.arange(1 << width)[None, :]
    out = np.zeros((1 << width, 1 << width), dtype=np.int64)
    for i in range(width):
        for j in range(width):
            if i + j >= columns:
                out += (((a >> i) & 1) * ((b >> j) & 1)) << (i + j)
    return out


@pytest.fixture(scope="module")
def lut_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("lut") / "trunc.npz"
    LutFile(truncated_product(WIDTH, COLUMNS), width_a=WIDTH, width_b=WIDTH, signed=False,
            metadata={"name": f"truncated {WIDTH}x{WIDTH} unsigned, {COLUMNS} columns"}).save(path)
    return path


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("pretrained")


# --- what the recipe sets, and what wins over it ------------------------------------------------------

def test_recipe_defaults():
    cfg = RetrainConfig(lut="m.npz", recipe="date25")
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.milestones) == (30, 64, 1e-3, 0.0, (10, 20))
    assert (cfg.weight_scheme, cfg.approximate, cfg.calibration) == ("per_tensor", "conv", "epoch")
    assert (cfg.half_window, cfg.trial_model, cfg.trial_epochs) == ("auto", "lenet5", 5)
    assert cfg.augment == "none" and cfg.given == ()  # digits: no crop and flip
    assert RetrainConfig(lut="m.npz", recipe="date25", dataset="cifar10").augment == "crop-flip"
    assert RetrainConfig(lut="m.npz", recipe="date25", dataset="cifar100").augment == "crop-flip"


def test_plain_defaults_unchanged():
    cfg = RetrainConfig(lut="m.npz", model="resnet8")
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.milestones) == (3, 64, 1e-3, 0.0, (1, 2))
    assert (cfg.weight_scheme, cfg.approximate, cfg.calibration, cfg.augment) == ("per_channel", "all", "batches",
                                                                                  "none")
    assert (cfg.half_window, cfg.trial_model, cfg.trial_epochs) == (None, "resnet8", 1)


def test_explicit_values_win():
    cfg = RetrainConfig(lut="m.npz", recipe="date25", dataset="cifar10", epochs=6, weight_scheme="per_channel",
                        approximate="all", calibration="batches", augment="none", milestones=[5, 1],
                        half_window="stored", trial_model="resnet8", trial_epochs=1, lr=0.01, weight_decay=1e-4,
                        batch_size=32)
    assert (cfg.epochs, cfg.weight_scheme, cfg.approximate, cfg.calibration, cfg.augment) == \
        (6, "per_channel", "all", "batches", "none")
    assert (cfg.milestones, cfg.half_window, cfg.trial_model, cfg.trial_epochs) == ((1, 5), None, "resnet8", 1)
    assert (cfg.lr, cfg.weight_decay, cfg.batch_size) == (0.01, 1e-4, 32)
    assert set(cfg.given) == {"epochs", "weight_scheme", "approximate", "calibration", "augment", "milestones",
                              "half_window", "trial_model", "trial_epochs", "lr", "weight_decay", "batch_size"}


def test_cli_recipe_with_one_flag_overridden():
    args = build_parser().parse_args(["retrain", "--lut", "m.npz", "--recipe", "date25", "--epochs", "2",
                                      "--approximate", "all", "--half-window", "4"])
    cfg = build_config(RetrainConfig, args)
    assert (cfg.recipe, cfg.epochs, cfg.approximate, cfg.half_window) == ("date25", 2, "all", 4)
    assert (cfg.weight_scheme, cfg.calibration, cfg.milestones) == ("per_tensor", "epoch", (10, 20))
    assert set(cfg.given) == {"epochs", "approximate", "half_window"}


@pytest.mark.parametrize("kw, message", [
    (dict(recipe="date24"), "Recipe must be one of 'date25' or None, not 'date24'"),
    (dict(approximate="linear"), "approximate must be one of 'all', 'conv', not 'linear'"),
    (dict(weight_scheme="per_row"), "Weight scheme must be one of 'per_channel', 'per_tensor', not 'per_row'"),
    (dict(calibration="none"), "Calibration must be one of 'batches', 'epoch', not 'none'"),
    (dict(augment="flip"), "Augmentation must be one of 'none', 'crop-flip', not 'flip'"),
    (dict(milestones=(0, 3)), "milestones must be a sequence of positive integers (epochs), not (0, 3)"),
    (dict(weight_decay=-1.0), "weight_decay must be a finite non-negative number, not -1.0"),
    (dict(trial_epochs=0), "trial_epochs must be a positive integer, not 0"),
    (dict(trial_model="vgg"), None),
])
def test_recipe_config_wrong(kw, message):
    with pytest.raises(RetrainError, match=exact(message) if message else "^Trial model must be one of "):
        RetrainConfig(**{"lut": "m.npz", "recipe": "date25", **kw})


def test_recipe_refuses_a_signed_lut(tmp_path):
    path = tmp_path / "signed.npz"
    v = np.arange(-8, 8)
    prod = (np.roll(v, -8)[:, None] * np.roll(v, -8)[None, :]).astype(np.int64)  # codes 0..15, two's complement
    lut = LutFile(prod, width_a=4, width_b=4, signed=True, metadata={"name": "exact signed 4x4"})
    lut.save(path)
    with pytest.raises(RetrainError, match=exact(
            f"Recipe date25 quantizes unsigned asymmetric, for unsigned multipliers; LUT {lut.lut_id} is signed. "
            f"Run without --recipe (signed symmetric quantization), or give an unsigned multiplier")):
        run_retrain(RetrainConfig(lut=str(path), recipe="date25", out=str(tmp_path / "o"), progress=False))


def test_approximate_conv_needs_a_conv_layer(lut_path, pretrained_dir, tmp_path):
    with pytest.raises(RetrainError, match=exact("--approximate conv: the model (MLP) has no Conv2d layer to "
                                                 "approximate")):
        run_retrain(RetrainConfig(lut=str(lut_path), recipe="date25", model="mlp", epochs=1, pretrain_epochs=1,
                                  pretrained_dir=str(pretrained_dir), out=str(tmp_path / "o"), progress=False,
                                  threads=1))


# --- end to end --------------------------------------------------------------------------------------

def recipe_run(lut_path, pretrained_dir, out, **kw):
    base = dict(lut=str(lut_path), recipe="date25", model="lenet5", dataset="digits", epochs=1, pretrain_epochs=1,
                grads=("lut2d",), trial_batches=1, calib_batches=2, time_exact=False, progress=False, threads=1,
                out=str(out), pretrained_dir=str(pretrained_dir))
    res = run_retrain(RetrainConfig(**{**base, **kw}))
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    return on_disk


def test_recipe_end_to_end_records_every_setting(lut_path, pretrained_dir, tmp_path):
    """LeNet-5 on digits, 1 epoch of LUT-2D; half window by 5-epoch LeNet trials of 1 batch each."""
    res = recipe_run(lut_path, pretrained_dir, tmp_path / "run")
    p = res["protocol"]
    assert p["recipe"] == "date25" and p["given"] == {"epochs": 1}
    assert res["config"]["recipe"] == "date25"
    # Quantization: unsigned asymmetric per tensor at the LUT's width, zero-point terms exact.
    assert p["quantization"] == {"activations": "unsigned asymmetric per-tensor",
                                 "weights": "unsigned asymmetric per-tensor", "weight_scheme": "per_tensor",
                                 "bits": {"activations": WIDTH, "weights": WIDTH}, "signed": False,
                                 "zero_point_terms": "exact"}
    # Only the convolutions multiply through the LUT; the Linear layers are quantized but exact.
    assert p["approximate"] == {"setting": "conv", "approximate": ["features.0", "features.3"],
                                "quantized_exact": ["classifier.1", "classifier.3", "classifier.5"],
                                "weight_schemes": ["per_tensor"], "attention": []}
    # Calibration: one un-augmented epoch in train mode (digits: 1437 training images, batch 64).
    assert p["calibration"] == {"method": "epoch", "batches": 23, "mode": "train", "augmented": False,
                                "batchnorm_updated": True}
    assert res["start"]["calibration"] == p["calibration"]
    assert p["augmentation"] == "none"
    assert p["schedule"] == {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "batch_size": 64, "epochs": 1,
                             "milestones": [10, 20], "gamma": 0.5, "test_every_epoch": True}
    assert p["metrics"] == ["top1"]
    # The half window: LeNet trials, 5 epochs each, one per H that fits 6-bit operands; lowest loss chosen.
    trials = res["half_window_trials"]["lut2d"]
    assert (trials["model"], trials["epochs"], trials["trial_batches"]) == ("lenet5", 5, 1)
    hs = [t["half_window"] for t in trials["trials"]]
    assert hs == [1, 2, 4, 8, 16]
    best = min(trials["trials"], key=lambda t: (t["train_loss_after"], t["half_window"]))["half_window"]
    assert trials["chosen"] == best == p["half_window"]["chosen"]["lut2d"] == res["modes"]["lut2d"]["half_window"]
    assert p["half_window"]["setting"] == "auto" and p["half_window"]["trial_model"] == "lenet5"
    assert p["half_window"]["trial_epochs"] == 5
    # Test accuracy every epoch, at the recipe's learning rate; no top-5 on 10 classes.
    hist = res["modes"]["lut2d"]["history"]
    assert [r["epoch"] for r in hist] == [1]
    assert all(r["lr"] == 1e-3 and 0 <= r["test_accuracy"] <= 1 and "test_top5" not in r for r in hist)
    assert res["modes"]["lut2d"]["approx_after_top5"] is None


@pytest.mark.slow
def test_recipe_trials_on_their_own_lenet(lut_path, pretrained_dir, tmp_path):
    """ResNet-8 retrained; the half-window trials run on a LeNet-5 pretrained beside it."""
    res = recipe_run(lut_path, pretrained_dir, tmp_path / "run", model="resnet8")
    assert res["half_window_trials"]["lut2d"]["model"] == "lenet5"
    assert {f.name.split("-")[0] for f in pretrained_dir.glob("*.pt")} >= {"lenet5", "resnet8"}
    p = res["protocol"]
    assert p["approximate"]["quantized_exact"] == ["fc"] and len(p["approximate"]["approximate"]) == 9


# --- augmentation --------------------------------------------------------------------------------------

def test_crop_flip_is_a_padded_crop_or_its_mirror():
    info = DATASETS["cifar10"]
    images = torch.randint(1, 256, (3, 3, 32, 32), dtype=torch.uint8)
    ds = ImageDataset(images, torch.zeros(3, dtype=torch.int64), info, normalize=False, augment="crop-flip")
    padded = torch.nn.functional.pad(images[1].float() / 255, (4, 4, 4, 4))
    windows = [padded[:, t:t + 32, s:s + 32] for t in range(9) for s in range(9)]
    windows += [w.flip(-1) for w in windows]
    torch.manual_seed(0)
    seen = set()
    for _ in range(20):
        x, _ = ds[1]
        match = [i for i, w in enumerate(windows) if torch.equal(w, x)]
        assert match
        seen.add(match[0])
    assert len(seen) > 1  # random
    assert torch.equal(ds.with_augment("none")[1][0], images[1].float() / 255)


def test_make_loaders_augments_training_data_only():
    loaders = make_loaders("digits", 16, augment="crop-flip")
    assert loaders.train.dataset.augment == "crop-flip" and loaders.test.dataset.augment == "none"


def test_recipe_listed():
    assert "date25" in RECIPES


def test_vit_run_records_its_approximate_attention(lut_path, pretrained_dir, tmp_path):
    """A ViT's attention products go through the LUT too; the results say which modules."""
    res = recipe_run(lut_path, pretrained_dir, tmp_path / "vit", recipe=None, model="vit-tiny", grads=("ste",),
                     half_window=None, approximate="all")
    kinds = res["protocol"]["approximate"]
    assert kinds["attention"] == ["blocks.0.attn.sdpa_lut", "blocks.1.attn.sdpa_lut"]
    assert "blocks.0.attn.qkv" in kinds["approximate"] and kinds["quantized_exact"] == []
