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
    val_size: int  # training images set aside for validation (model and epoch selection)


INFO = {
    "cifar10": DatasetInfo("cifar10", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465),
                           (0.2023, 0.1994, 0.2010), "cifar_resnet110", 20, 5_000),
    "imagenet": DatasetInfo("imagenet", 1000, (3, 224, 224), (0.485, 0.456, 0.406),
                            (0.229, 0.224, 0.225), "resnet50", 100, 10_000),
    "mini_imagenet50": DatasetInfo("mini_imagenet50", 50, (3, 224, 224), (0.485, 0.456, 0.406),
                                   (0.229, 0.224, 0.225), "resnet50", 10, 2_500),
    "digits": DatasetInfo("digits", 10, (1, 8, 8), (0.3,), (0.4,), "small_cnn", 1, 237),
}
# The validation split is drawn with this seed, whatever a run's seed: every run and every trial
# of a search selects on the same images, and none of them is ever trained on.
VALIDATION_SEED = 20_211


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


DIGITS_TRAIN = 1437  # of scikit-learn's 1,797 digits; the other 360 are the test split


def digits_split_indices(split: str) -> torch.Tensor:
    """Which of scikit-learn's digits (in its order) form `split`: the first 1,437 of a fixed
    permutation are the training split, the rest the test split."""
    order = torch.from_numpy(np.random.RandomState(0).permutation(1797))
    return order[:DIGITS_TRAIN] if split == "train" else order[DIGITS_TRAIN:]


def digits(split: str) -> TensorDataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(d.target, dtype=torch.long)
    chosen = digits_split_indices(split)
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


def train_val_indices(length: int, val_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The training split's images cut in two by a fixed permutation: (train, validation)
    indices into the training split, disjoint, sorted."""
    if not 0 <= val_size < length:
        raise DataError(f"val_size {val_size} must lie in [0, {length}) for a training split of "
                        f"{length} images")
    order = torch.randperm(length, generator=torch.Generator().manual_seed(VALIDATION_SEED))
    return order[val_size:].sort().values, order[:val_size].sort().values


def subset_indices(length: int, start: int = 0, skip: int = 1, max_count: int | None = None) -> list[int]:
    """Indices start, start + skip, ... (at most max_count of them): the certified test subset."""
    if skip < 1 or start < 0:
        raise DataError(f"subset needs start >= 0 and skip >= 1 (got start={start}, skip={skip})")
    idx = list(range(start, length, skip))
    return idx if max_count is None else idx[:max_count]


def load_tensors(name: str, split: str, data_dir: str | Path | None = None, download: bool = False,
                 cache_dir: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A small data set (digits, cifar10) as (images float32 in [0, 1], labels), decoded once.

    Decoded CIFAR-10 images are cached as uint8 under cache_dir (default ~/.cache/sodm), keyed by
    the data directory and split, so later runs skip the JPEG decoding."""
    if name == "digits":
        return digits(split).tensors
    if name != "cifar10":
        raise DataError(f"{name} is too large to hold in memory; it is read through a DataLoader")
    dataset = load_dataset(name, split, data_dir, download=download)
    root = Path(data_dir).expanduser().resolve()
    cache_dir = Path(cache_dir or Path.home() / ".cache" / "sodm")
    import hashlib

    key = hashlib.sha256(f"{root}|{split}|{len(dataset)}".encode()).hexdigest()[:16]
    cache = cache_dir / f"cifar10-{split}-{key}.pt"
    if cache.is_file():
        blob = torch.load(cache, weights_only=True)
        return blob["x"].float().div_(255), blob["y"]
    loader = torch.utils.data.DataLoader(dataset, batch_size=500, num_workers=2)
    xs, ys = [], []
    for x, y in loader:
        xs.append((x * 255).round().to(torch.uint8))
        ys.append(y)
    x8, y = torch.cat(xs), torch.cat(ys)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    torch.save({"x": x8, "y": y}, tmp)
    tmp.replace(cache)
    return x8.float().div_(255), y


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip of a batch, on its own device."""
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b, 1), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b, 1), device=x.device, generator=generator)
    rows = (torch.arange(h, device=x.device) + dy)[:, :, None]  # (b, h, 1)
    cols = torch.arange(w, device=x.device) + dx  # (b, w)
    flip = torch.rand(b, device=x.device, generator=generator) < 0.5
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, :]  # (b, 1, w)
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


class TrainData:
    """The training set as batches on `device`, shuffled by (seed, epoch) so that a resumed run
    sees the same order. digits and CIFAR-10 live in memory on the device (augmented there);
    ImageNet-size sets are read through a DataLoader with `loader_workers` processes."""

    def __init__(self, name: str, data_dir, batch_size: int, device: torch.device, seed: int,
                 augment: bool = True, subset: int | None = None, download: bool = False,
                 loader_workers: int = 8, rank: int = 0, world_size: int = 1, val_size: int = 0):
        """batch_size is per rank; each rank reads its own shard of every epoch's order. The
        val_size validation images (`train_val_indices`) are left out; subset: train on the first
        k of a permutation (by seed) of the rest."""
        self.name, self.batch_size, self.device, self.seed = name, batch_size, device, seed
        self.rank, self.world_size = rank, world_size
        self.augment = augment and name == "cifar10"
        self.x = self.y = self.dataset = None
        if name in ("digits", "cifar10"):
            x, y = load_tensors(name, "train", data_dir, download)
            keep = train_val_indices(len(y), val_size)[0]
            if subset is not None:
                keep = keep[torch.randperm(len(keep), generator=torch.Generator().manual_seed(seed))[:subset]]
            self.x, self.y = x[keep].to(device), y[keep].to(device)
            self.length = len(keep)
        else:
            self.dataset = load_dataset(name, "train", data_dir, augment=augment)
            keep = train_val_indices(len(self.dataset), val_size)[0]
            if subset is not None:
                keep = keep[torch.randperm(len(keep), generator=torch.Generator().manual_seed(seed))[:subset]]
            self.dataset = torch.utils.data.Subset(self.dataset, keep.tolist())
            self.length = len(self.dataset)
            self.loader_workers = loader_workers

    def steps_per_epoch(self) -> int:
        return -(-(self.length // self.world_size) // self.batch_size)

    def epoch(self, epoch: int, aug_generator: torch.Generator | None = None):
        """Yield this rank's (x, y) batches of the epoch on the device. The epoch's order is cut
        to a multiple of the world size so that every rank takes the same number of steps."""
        order = torch.randperm(self.length, generator=torch.Generator().manual_seed(
            self.seed * 1_000_003 + epoch))
        order = order[: len(order) - len(order) % self.world_size][self.rank::self.world_size]
        if self.x is not None:
            for idx in order.to(self.device).split(self.batch_size):
                x = self.x[idx]
                if self.augment:
                    x = random_crop_flip(x, aug_generator)
                yield x, self.y[idx]
            return
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=order.tolist(),
            num_workers=self.loader_workers, pin_memory=self.device.type == "cuda",
            persistent_workers=False)
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def sample(self, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """k random training images (no augmentation), for the mapping refresher."""
        idx = torch.randint(0, self.length, (k,), generator=generator, device=generator.device)
        if self.x is not None:
            idx = idx.to(self.device)
            return self.x[idx], self.y[idx]
        items = [self.dataset[i] for i in idx.tolist()]
        return (torch.stack([x for x, _ in items]).to(self.device),
                torch.tensor([y for _, y in items], device=self.device))
