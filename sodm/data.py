"""Data sets, as pixels in [0, 1] (noise is added there; normalisation lives in the model).

  cifar10          torchvision's official files under data_dir (downloaded only with download=True),
                   or any ImageFolder root with train/<class>/ and test/<class>/
  imagenet         ImageFolder root with train/<class>/ and val/<class>/
  mini_imagenet50  the same ImageNet root restricted to 50 classes: the sorted class folder names,
                   sampled with random.Random(MINI_IMAGENET_SEED).sample(names, 50), then sorted
  digits           scikit-learn's 1,797 real 8x8 handwritten digits (no download), split by a fixed
                   permutation into 1,437 train and 360 test images
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

DATASETS = ("cifar10", "imagenet", "mini_imagenet50", "digits")
MINI_IMAGENET_SEED = 20210
SPLITS = ("train", "test")


class DataError(ValueError):
    """A data set that is unknown or a data directory without the expected layout."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_arch: str
    cohen_skip: int  # the field's usual certification subset: every cohen_skip-th test image


INFO = {
    "cifar10": DatasetInfo("cifar10", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465),
                           (0.2023, 0.1994, 0.2010), "cifar_resnet110", 20),
    "imagenet": DatasetInfo("imagenet", 1000, (3, 224, 224), (0.485, 0.456, 0.406),
                            (0.229, 0.224, 0.225), "resnet50", 100),
    "mini_imagenet50": DatasetInfo("mini_imagenet50", 50, (3, 224, 224), (0.485, 0.456, 0.406),
                                   (0.229, 0.224, 0.225), "resnet50", 10),
    "digits": DatasetInfo("digits", 10, (1, 8, 8), (0.3,), (0.4,), "small_cnn", 1),
}


def dataset_info(name: str) -> DatasetInfo:
    if name not in INFO:
        raise DataError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
    return INFO[name]


def load_dataset(name: str, split: str, data_dir: str | Path | None = None, augment: bool = False,
                 download: bool = False) -> Dataset:
    """The `split` ("train" or "test") of data set `name`; items are (image in [0, 1], label)."""
    dataset_info(name)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    if name == "digits":
        return digits(split)
    if data_dir is None:
        raise DataError(f"data set {name} needs --data-dir")
    root = Path(data_dir).expanduser()
    if name == "cifar10":
        return _cifar10(root, split, augment, download)
    return _imagenet(root, split, augment, classes=50 if name == "mini_imagenet50" else None)


def digits(split: str) -> TensorDataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(d.target, dtype=torch.long)
    order = torch.from_numpy(np.random.RandomState(0).permutation(len(labels)))
    n_train = 1437
    chosen = order[:n_train] if split == "train" else order[n_train:]
    return TensorDataset(images[chosen], labels[chosen])


def _cifar10(root: Path, split: str, augment: bool, download: bool) -> Dataset:
    import torchvision
    from torchvision import transforms as T

    tf = T.Compose(([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if augment else [])
                   + [T.ToTensor()])
    if (root / "train").is_dir() and (root / "test").is_dir():
        return torchvision.datasets.ImageFolder(str(root / split), transform=tf)
    if not (root / "cifar-10-batches-py").is_dir() and not download:
        raise DataError(f"data directory {root} has neither train/ and test/ class folders nor "
                        "torchvision's cifar-10-batches-py/ (add --download to fetch CIFAR-10)")
    try:
        return torchvision.datasets.CIFAR10(str(root), train=split == "train", transform=tf,
                                            download=download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted."
        raise DataError(f"CIFAR-10 under {root}: {e}") from None
    except OSError as e:  # no network
        raise DataError(f"could not download CIFAR-10 into {root}: {e}") from None


def _imagenet(root: Path, split: str, augment: bool, classes: int | None) -> Dataset:
    import torchvision
    from torchvision import transforms as T

    folder = root / ("train" if split == "train" else "val")
    if not folder.is_dir():
        raise DataError(f"data directory {root} has no {folder.name}/ folder of class folders")
    if augment:
        tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor()])
    else:
        tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()])
    names = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if classes is not None:
        if len(names) < classes:
            raise DataError(f"{folder} has {len(names)} class folders; mini_imagenet50 needs >= 50")
        names = mini_imagenet_classes(names, classes)

    class Subset(torchvision.datasets.ImageFolder):
        def find_classes(self, directory):
            return names, {c: i for i, c in enumerate(names)}

    return Subset(str(folder), transform=tf)


def mini_imagenet_classes(names: list[str], count: int = 50) -> list[str]:
    """The fixed, documented choice of `count` classes out of the sorted class names."""
    return sorted(random.Random(MINI_IMAGENET_SEED).sample(sorted(names), count))


def subset_indices(length: int, start: int = 0, skip: int = 1, max_count: int | None = None) -> list[int]:
    """Indices start, start + skip, ... (at most max_count of them): the certified test subset."""
    if skip < 1 or start < 0:
        raise DataError(f"subset needs start >= 0 and skip >= 1 (got start={start}, skip={skip})")
    idx = list(range(start, length, skip))
    return idx if max_count is None else idx[:max_count]
