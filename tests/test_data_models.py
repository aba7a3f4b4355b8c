import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from sodm.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from sodm.data import (DataError, digits_split_indices, load_dataset, mini_imagenet_classes,
                       subset_indices)
from sodm.models import Normalize, build_model, describe_model


def test_digits_split():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert len(train) == 1437 and len(test) == 360
    x, y = train[0]
    assert x.shape == (1, 8, 8) and 0.0 <= x.min() and x.max() <= 1.0
    assert set(test.tensors[1].tolist()) == set(range(10))
    # Train and test are disjoint parts of one fixed permutation of scikit-learn's digits, and
    # each split holds exactly the images its indices name.
    from sklearn.datasets import load_digits

    train_idx, test_idx = digits_split_indices("train"), digits_split_indices("test")
    assert set(train_idx.tolist()).isdisjoint(test_idx.tolist())
    assert sorted(train_idx.tolist() + test_idx.tolist()) == list(range(1797))
    images = torch.tensor(load_digits().images / 16.0, dtype=torch.float32).unsqueeze(1)
    assert torch.equal(train.tensors[0], images[train_idx])
    assert torch.equal(test.tensors[0], images[test_idx])
    assert torch.equal(load_dataset("digits", "test").tensors[0], test.tensors[0])  # fixed


def _image_folder(root, split, classes, per_class, size=32):
    for c in classes:
        (root / split / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.full((size, size, 3), 40 * i, dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / c / f"{i}.png")


def test_cifar10_image_folder(tmp_path):
    _image_folder(tmp_path, "train", ["a", "b"], 2)
    _image_folder(tmp_path, "test", ["a", "b"], 3)
    test = load_dataset("cifar10", "test", tmp_path)
    assert len(test) == 6
    x, y = test[4]
    assert x.shape == (3, 32, 32) and y == 1
    augmented = load_dataset("cifar10", "train", tmp_path, augment=True)
    assert augmented[0][0].shape == (3, 32, 32)


def test_cifar10_torchvision_files(tmp_path, monkeypatch):
    """torchvision's official pickled batches, made small by hand (the integrity check is md5-based,
    so it is skipped here; everything else is torchvision's real reader)."""
    import torchvision

    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.RandomState(0)
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                 "test_batch"]:
        with open(base / name, "wb") as f:
            pickle.dump({"data": rng.randint(0, 256, (4, 3072), dtype=np.uint8),
                         "labels": [0, 1, 2, 3]}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    train, test = load_dataset("cifar10", "train", tmp_path), load_dataset("cifar10", "test", tmp_path)
    assert len(train) == 20 and len(test) == 4
    x, y = test[3]
    assert x.shape == (3, 32, 32) and y == 3


def test_data_errors(tmp_path):
    with pytest.raises(DataError, match="unknown data set"):
        load_dataset("mnist", "test", tmp_path)
    with pytest.raises(DataError, match="neither train/ and test/"):
        load_dataset("cifar10", "test", tmp_path)
    with pytest.raises(DataError, match="no val/"):
        load_dataset("imagenet", "test", tmp_path)
    with pytest.raises(DataError, match="needs --data-dir"):
        load_dataset("imagenet", "test", None)


def test_mini_imagenet_choice_is_fixed(tmp_path):
    names = [f"n{i:08d}" for i in range(1000)]
    chosen = mini_imagenet_classes(names)
    assert len(chosen) == 50 == len(set(chosen)) and chosen == sorted(chosen)
    assert chosen == mini_imagenet_classes(list(reversed(names)))  # order of listing is irrelevant
    _image_folder(tmp_path, "val", names[:60], 1, size=8)
    ds = load_dataset("mini_imagenet50", "test", tmp_path)
    assert len(ds) == 50 and ds.classes == mini_imagenet_classes(names[:60])


def test_subset_indices():
    assert subset_indices(10000, 0, 20, None)[:3] == [0, 20, 40]
    assert len(subset_indices(10000, 0, 20, None)) == 500
    assert subset_indices(10, 1, 3, 2) == [1, 4]
    with pytest.raises(DataError):
        subset_indices(10, 0, 0)


@pytest.mark.parametrize("arch,shape", [("cifar_resnet20", (3, 32, 32)), ("small_cnn", (1, 8, 8)),
                                        ("cifar_resnet8", (3, 32, 32))])
def test_models_forward(arch, shape):
    model = build_model(arch, 10, [0.5] * shape[0], [0.25] * shape[0])
    assert isinstance(model[0], Normalize)
    assert model(torch.rand(2, *shape)).shape == (2, 10)


def test_model_depth_and_name_errors():
    with pytest.raises(ValueError, match="6k\\+2"):
        build_model("cifar_resnet21", 10, [0.5] * 3, [0.2] * 3)
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("vgg16", 10, [0.5] * 3, [0.2] * 3)


def test_cifar_resnet110_depth():
    net = build_model("cifar_resnet110", 10, [0.5] * 3, [0.2] * 3)[1]
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) + 1 == 110  # 109 3x3 convolutions and the final linear layer


def test_checkpoint_roundtrip_and_mismatch(tmp_path):
    model = build_model("small_cnn", 10, [0.3], [0.4])
    desc = describe_model("small_cnn", 10, [0.3], [0.4], 1)
    path = save_checkpoint(tmp_path / "c.pt", model, desc, dataset="digits", sigma=0.5,
                           method="sodm", config={"beta": 6.0})
    ckpt = load_checkpoint(path)
    assert ckpt["sigma"] == 0.5 and ckpt["config"] == {"beta": 6.0}
    restored = model_from_checkpoint(ckpt)
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(restored(x), model.eval()(x))
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temporary behind
    ckpt["model"]["arch"] = "cifar_resnet20"
    with pytest.raises(CheckpointError, match="do not match"):
        model_from_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "junk.pt")


def test_validation_split_is_carved_from_training_and_never_trained_on():
    from sodm.data import TrainData, train_val_indices

    train_idx, val_idx = train_val_indices(1437, 237)
    assert len(train_idx) == 1200 and len(val_idx) == 237
    assert set(train_idx.tolist()).isdisjoint(val_idx.tolist())
    assert sorted(train_idx.tolist() + val_idx.tolist()) == list(range(1437))
    assert torch.equal(train_val_indices(1437, 237)[1], val_idx)  # fixed, whatever the run's seed
    # The training data holds exactly the training part (and a train_subset is drawn from it).
    x_all, _ = load_dataset("digits", "train").tensors
    data = TrainData("digits", None, 64, torch.device("cpu"), seed=3, val_size=237)
    assert data.length == 1200 and torch.equal(data.x, x_all[train_idx])
    sub = TrainData("digits", None, 64, torch.device("cpu"), seed=3, subset=100, val_size=237)
    keep = train_idx[torch.randperm(1200, generator=torch.Generator().manual_seed(3))[:100]]
    assert sub.length == 100 and torch.equal(sub.x, x_all[keep])
    # Validation and test are different images: the test split is a different split altogether.
    test_idx = digits_split_indices("test")
    assert set(digits_split_indices("train")[val_idx].tolist()).isdisjoint(test_idx.tolist())
    with pytest.raises(DataError, match="val_size"):
        train_val_indices(100, 100)
