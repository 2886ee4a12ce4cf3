"""Generic training: offline data sets, reference models, the training loop, checkpoints.

Knows nothing of approximate multipliers: any ``torch.nn.Module`` trains here. Data that
ships offline (``digits``, ``mnist5k``) and standard-format loaders for user directories
(MNIST IDX, CIFAR-10/100 pickles); models built by name (``lenet5``, ``mlp``, ``resnet8`` ...);
``fit`` with per-epoch atomic checkpoints and bit-identical resume.
"""

from ..heap import keep_freed_memory

keep_freed_memory()  # a training step's tensors stay in the heap (see appmult.heap)

from .data import (
    AUGMENTATIONS,
    DATASETS,
    DatasetFormatError,
    DatasetInfo,
    ImageDataset,
    Loaders,
    TrainTest,
    data_digest,
    load_cifar10,
    load_cifar100,
    load_digits_dataset,
    load_mnist5k,
    load_mnist_idx,
    make_loaders,
)
from .cifar_models import (
    CIFAR_MODELS,
    TORCHVISION_PREFIX,
    CifarResNet,
    VGG,
    check_torchvision_name,
)
from .models import (
    LeNet5,
    MLP,
    MODEL_NAMES,
    ResNet,
    build_model,
)
from .checkpoints import (
    CHECKPOINT_NAME,
    CheckpointError,
    load_checkpoint,
    read_torch_file,
)
from .pretraining import (
    Pretrained,
    load_pretrained,
    pretrain_fp32,
)
from .training import (
    Metrics,
    default_milestones,
    deterministic_algorithms,
    evaluate,
    fit,
    plot_history,
    seed_everything,
    train_epoch,
)

__all__ = [
    "AUGMENTATIONS",
    "build_model",
    "check_torchvision_name",
    "CIFAR_MODELS",
    "CifarResNet",
    "TORCHVISION_PREFIX",
    "VGG",
    "load_cifar100",
    "CHECKPOINT_NAME",
    "CheckpointError",
    "DatasetFormatError",
    "DatasetInfo",
    "DATASETS",
    "default_milestones",
    "deterministic_algorithms",
    "evaluate",
    "fit",
    "ImageDataset",
    "LeNet5",
    "load_checkpoint",
    "data_digest",
    "load_cifar10",
    "load_digits_dataset",
    "load_mnist5k",
    "load_mnist_idx",
    "load_pretrained",
    "Loaders",
    "make_loaders",
    "Metrics",
    "MLP",
    "MODEL_NAMES",
    "plot_history",
    "read_torch_file",
    "pretrain_fp32",
    "Pretrained",
    "ResNet",
    "seed_everything",
    "train_epoch",
    "TrainTest",
]
