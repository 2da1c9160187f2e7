"""Datasets read from local files only, and per-sample seeding."""
import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from util.datasets import SeededDataset, build_dataset, build_transform, read_idx, subset

TO_TENSOR = transforms.ToTensor()


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_round_trip_and_gray_to_rgb(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (5, 28, 28)), np.array([3, 1, 4, 1, 5])
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images, 2051)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels, 2049)
    dataset = build_dataset("fashion_mnist", str(tmp_path), "val", TO_TENSOR)
    assert len(dataset) == 5 and dataset.num_classes == 10
    img, label = dataset[2]
    assert img.shape == (3, 28, 28) and label == 4
    expected = torch.from_numpy(images[2].astype(np.float32) / 255)
    for channel in range(3):
        assert torch.allclose(img[channel], expected)
    _write_idx(tmp_path / "bad.gz", labels, 2049)
    with pytest.raises(ValueError, match="bad.gz"):
        read_idx(tmp_path / "bad.gz", 2051)


def test_real_fashion_mnist_if_installed():
    root = Path("/usr/share/datasets/fashion-mnist")
    if not (root / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (scripts/demo.sh installs it)")
    train, test = (build_dataset("fashion_mnist", str(root), split, None) for split in ("train", "val"))
    assert (len(train), len(test)) == (60000, 10000)
    assert sorted(set(int(v) for v in test.labels)) == list(range(10))


def test_imagefolder_labelled_with_grayscale_and_test_split(tmp_path):
    for split in ("train", "test"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("L", (8, 8), 200).save(tmp_path / split / name / "0.png")
    train = build_dataset("imagefolder", str(tmp_path), "train", TO_TENSOR)
    val = build_dataset("imagefolder", str(tmp_path), "val", TO_TENSOR)  # falls back to test/
    assert train.num_classes == 2 and len(val) == 2
    img, label = train[1]
    assert img.shape == (3, 8, 8) and label == 1


def test_unlabelled_folder_for_pretraining(tmp_path):
    (tmp_path / "nested").mkdir()
    for i, folder in enumerate((tmp_path, tmp_path / "nested")):
        Image.new("RGB", (8, 8)).save(folder / f"{i}.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    dataset = build_dataset("imagefolder", str(tmp_path), "train", TO_TENSOR)
    assert len(dataset) == 2 and dataset.num_classes == 0 and dataset[0][1] == -1


def test_missing_and_empty_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data_path .*nowhere"):
        build_dataset("imagefolder", str(tmp_path / "nowhere"), "train", None)
    with pytest.raises(FileNotFoundError, match=f"no images found in {tmp_path}"):
        build_dataset("imagefolder", str(tmp_path), "train", None)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        build_dataset("cifar10", str(tmp_path), "train", None)
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("imagenet22k", str(tmp_path), "train", None)


def test_cifar10_pickles(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (2, 3072)).astype(np.uint8), "labels": [7, 2]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    import torchvision.datasets.cifar

    # the fake files carry no official checksums
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    train = build_dataset("cifar10", str(tmp_path), "train", TO_TENSOR)
    assert len(train) == 10 and train.num_classes == 10 and train[1][1] == 2 and train[0][0].shape == (3, 32, 32)


def _seeded(tmp_path: Path) -> SeededDataset:
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)).save(tmp_path / "x.png")
    for i in range(1, 12):
        (tmp_path / f"x{i}.png").write_bytes((tmp_path / "x.png").read_bytes())
    base = build_dataset("imagefolder", str(tmp_path), "train", build_transform(True, 16, "pretrain"))
    return SeededDataset(base, seed=5, noise_size=16)


def test_seeded_samples_depend_only_on_seed_epoch_and_index(tmp_path):
    first, second = _seeded(tmp_path), _seeded(tmp_path)
    a = first[3]
    _ = second[7], second[0]  # other accesses in between change nothing
    b = second[3]
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert a[2].shape == (16,) and 0 <= a[2].min() and a[2].max() < 1
    assert not torch.equal(first[4][0], a[0])  # same image file, other index: other crop
    second.set_epoch(1)
    assert not torch.equal(second[3][2], a[2])


def test_batches_do_not_depend_on_worker_count(tmp_path):
    dataset = _seeded(tmp_path)
    batches = [list(DataLoader(dataset, batch_size=4, num_workers=workers)) for workers in (0, 2)]
    for x, y in zip(*batches):
        assert torch.equal(x[0], y[0]) and torch.equal(x[2], y[2])


def test_subset_is_fixed_and_keeps_num_classes(tmp_path):
    dataset = _seeded(tmp_path).dataset
    dataset.num_classes = 0
    a, b = subset(dataset, 5, seed=1), subset(dataset, 5, seed=1)
    assert a.indices == b.indices and len(set(a.indices)) == 5 and a.num_classes == 0
    assert subset(dataset, 0, seed=1) is dataset
