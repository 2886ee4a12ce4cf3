"""The CIFAR networks of the published results, torchvision by name, the CIFAR-100 loader, top-5."""

from __future__ import annotations

import importlib.util
import pickle

import numpy as np
import pytest
from conftest import exact

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from appmult.errors import ConfigError  # noqa: E402
from appmult.flows import RetrainConfig, RetrainError  # noqa: E402
from appmult.nn import ApproxConv2d, ApproxLinear  # noqa: E402
from appmult.train import DATASETS, DatasetFormatError, build_model, evaluate, load_cifar100, make_loaders  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HAVE_TORCHVISION = importlib.util.find_spec("torchvision") is not None


@pytest.mark.parametrize("name, params", [("vgg19_bn", 20_040_522), ("resnet18", 11_173_962),
                                          ("resnet34", 21_282_122), ("resnet50", 23_520_842)])
def test_cifar_models_shapes(name, params):
    model = build_model(name, DATASETS["cifar10"]).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    # The usual CIFAR variants (3x3 stem, no stem pooling, one linear classifier).
    assert sum(p.numel() for p in model.parameters()) == params
    assert type(list(model.modules())[-1]) is nn.Linear or any(type(m) is nn.Linear for m in model.modules())


@pytest.mark.parametrize("name", ["vgg19_bn", "resnet18"])
def test_cifar_models_on_small_images_and_100_classes(name):
    with torch.no_grad():
        assert build_model(name, DATASETS["digits"]).eval()(torch.zeros(1, 1, 8, 8)).shape == (1, 10)
        assert build_model(name, DATASETS["cifar100"]).eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 100)


def test_vgg19_has_batchnorm_after_every_conv():
    model = build_model("vgg19_bn", DATASETS["cifar10"])
    mods = list(model.features)
    convs = [i for i, m in enumerate(mods) if type(m) is nn.Conv2d]
    assert len(convs) == 16 and all(type(mods[i + 1]) is nn.BatchNorm2d for i in convs)


def test_resnet50_is_the_bottleneck_network():
    model = build_model("resnet50", DATASETS["cifar100"])
    assert model.depth == 50 and model.linear.in_features == 2048
    # Names as in the common CIFAR reference code (its checkpoints load).
    keys = set(model.state_dict())
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.conv3.weight", "layer4.2.bn3.weight",
            "layer2.0.shortcut.0.weight", "linear.bias"} <= keys


@pytest.mark.skipif(HAVE_TORCHVISION, reason="torchvision is installed")
def test_torchvision_model_without_torchvision_wrong():
    message = ("Model 'torchvision:resnet18' needs torchvision, which is not installed; install the torchvision "
               f"build that matches torch {torch.__version__}, or choose a built-in model")
    with pytest.raises(ConfigError, match=exact(message)):
        build_model("torchvision:resnet18", DATASETS["cifar10"])
    with pytest.raises(RetrainError, match=exact(message)):
        RetrainConfig(lut="m.npz", model="torchvision:resnet18")


def test_torchvision_without_a_name_wrong():
    with pytest.raises(RetrainError, match=exact("Model 'torchvision:' names no torchvision model; write e.g. "
                                                 "'torchvision:resnet18'")):
        RetrainConfig(lut="m.npz", model="torchvision:")


@pytest.mark.skipif(not HAVE_TORCHVISION, reason="torchvision is not installed")
def test_torchvision_model_converts():  # pragma: no cover - torchvision absent here
    from appmult.lut_gen import LutFile, exact_product
    from appmult.nn import ApproxConfig, approximate_
    model = build_model("torchvision:resnet18", DATASETS["cifar10"])
    lut = LutFile(exact_product(4, 4, False), width_a=4, width_b=4, signed=False)
    approximate_(model, ApproxConfig(lut))
    assert any(isinstance(m, ApproxConv2d) for m in model.modules())
    assert any(isinstance(m, ApproxLinear) for m in model.modules())


# --- CIFAR-100 -------------------------------------------------------------------------------------------

def cifar100_file(n: int, seed: int) -> tuple[dict, np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    fine = [int(v) for v in rng.integers(0, 100, size=n)]
    batch = {b"filenames": [b"img%d.png" % i for i in range(n)], b"batch_label": b"training batch 1 of 1",
             b"fine_labels": fine, b"coarse_labels": [v // 5 for v in fine], b"data": data}
    return batch, data, fine


def write_cifar100(directory, n=4):
    inner = directory / "cifar-100-python"
    inner.mkdir()
    out = {}
    for i, split in enumerate(("train", "test")):
        batch, data, fine = cifar100_file(n, seed=i)
        pickled = pickle.dumps(batch, protocol=2).replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
        (inner / split).write_bytes(pickled)
        out[split] = (data, fine)
    return out


def test_cifar100(tmp_path):
    expected = write_cifar100(tmp_path, n=5)
    train = load_cifar100(tmp_path, "train", normalize=False)
    data, fine = expected["train"]
    assert len(train) == 5 and train.images.shape == (5, 3, 32, 32) and train.info.num_classes == 100
    assert train.labels.tolist() == fine
    assert np.array_equal(train.images[2, 1].numpy().ravel(), data[2, 1024:2048])
    x, y = load_cifar100(tmp_path / "cifar-100-python", "test")[3]
    red = torch.from_numpy(expected["test"][0][3, :1024].reshape(32, 32)).float() / 255
    assert torch.allclose(x[0], (red - 0.5071) / 0.2673) and y.item() == expected["test"][1][3]
    loaders = make_loaders("cifar100", 2, data_dir=tmp_path, augment="crop-flip")
    assert len(loaders.train.dataset) == 5 and loaders.info.num_classes == 100
    assert loaders.train.dataset.augment == "crop-flip"


def test_cifar100_missing_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match=exact(f"No test in {tmp_path}")):
        load_cifar100(tmp_path, "test")


def test_cifar100_labels_wrong(tmp_path):
    batch, _, _ = cifar100_file(2, 0)
    batch[b"fine_labels"] = [3, 100]
    (tmp_path / "test").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DatasetFormatError, match=exact(f"{tmp_path / 'test'} has labels outside 0..99")):
        load_cifar100(tmp_path, "test")


def test_cifar100_coarse_only_wrong(tmp_path):
    batch, _, _ = cifar100_file(2, 0)
    del batch[b"fine_labels"]
    (tmp_path / "test").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DatasetFormatError, match=exact(f"{tmp_path / 'test'} is not a CIFAR-100 batch: no 'data' "
                                                       f"and 'fine_labels' entries")):
        load_cifar100(tmp_path, "test")


def test_cifar100_malicious_wrong(tmp_path):
    path = tmp_path / "test"
    path.write_bytes(b"\x80\x02cos\nsystem\nX\x0b\x00\x00\x00touch pwnedq\x00\x85R.")
    with pytest.raises(DatasetFormatError, match=exact(
            f"{path} is not a plain CIFAR-100 batch: refusing to load global 'os.system' (only numpy arrays, "
            f"dicts, lists, bytes, str and int are allowed)")):
        load_cifar100(tmp_path, "test")
    assert not (tmp_path / "pwned").exists()


# --- top-5 -------------------------------------------------------------------------------------------------

def test_top5_against_brute_force():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 100, generator=g)
    labels = torch.randint(0, 100, (50,), generator=g)
    model = nn.Identity()
    m = evaluate(model, [(logits, labels)], top5=True)
    brute = sum(int(labels[i]) in logits[i].argsort(descending=True)[:5].tolist() for i in range(50)) / 50
    assert m.top5 == brute and m.accuracy == (logits.argmax(1) == labels).float().mean().item()
    assert evaluate(model, [(logits, labels)]).top5 is None
