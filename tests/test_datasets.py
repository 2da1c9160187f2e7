"""util.datasets on tiny generated data: local formats only, RGB out, and per-sample seeding."""
import argparse
import gzip
import pickle
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from util.datasets import (
    DATASETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SeededDataset,
    UnlabeledImageFolder,
    build_dataset,
    build_transform,
    denormalize,
    subset,
)

TO_TENSOR = transforms.ToTensor()
REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _noise_image(path: Path, seed: int, size: int = 32, mode: str = "RGB") -> np.ndarray:
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    pixels = np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)
    Image.fromarray(pixels, mode).save(path)
    return pixels


# ---------------------------------------------------------------- imagefolder


def test_imagefolder_classes_grayscale_to_rgb_and_test_fallback(tmp_path):
    pixels = {}
    for split in ("train", "test"):
        for label, name in enumerate(("cat", "dog")):
            (tmp_path / split / name).mkdir(parents=True)
            pixels[split, name, "rgb"] = _noise_image(tmp_path / split / name / "a.png", seed=label)
            pixels[split, name, "gray"] = _noise_image(tmp_path / split / name / "b.png", seed=10 + label, mode="L")
    train = build_dataset("imagefolder", str(tmp_path), "train", TO_TENSOR)
    val = build_dataset("imagefolder", str(tmp_path), "val", TO_TENSOR)  # no val/: reads test/
    assert train.num_classes == val.num_classes == 2 and len(train) == len(val) == 4
    assert [label for _, label in train.samples] == [0, 0, 1, 1]
    rgb, label = train[2]  # dog/a.png
    assert label == 1 and torch.equal(rgb, TO_TENSOR(pixels["train", "dog", "rgb"]))
    gray, label = val[1]  # cat/b.png, grayscale on disk
    assert label == 0 and gray.shape == (3, 32, 32)
    expected = torch.from_numpy(pixels["test", "cat", "gray"]).float() / 255
    assert all(torch.equal(gray[c], expected) for c in range(3))


def test_imagefolder_prefers_val_over_test(tmp_path):
    for split in ("val", "test"):
        (tmp_path / split / "only").mkdir(parents=True)
    _noise_image(tmp_path / "val" / "only" / "0.png", seed=0)
    for i in range(3):
        _noise_image(tmp_path / "test" / "only" / f"{i}.png", seed=i)
    assert len(build_dataset("imagefolder", str(tmp_path), "val", None)) == 1


def test_flat_and_nested_folder_is_unlabelled(tmp_path):
    (tmp_path / "nested" / "deeper").mkdir(parents=True)
    _noise_image(tmp_path / "b.png", seed=0)
    _noise_image(tmp_path / "nested" / "deeper" / "a.jpg", seed=1, mode="L")
    (tmp_path / "notes.txt").write_text("not an image")
    dataset = build_dataset("imagefolder", str(tmp_path), "train", TO_TENSOR)
    assert isinstance(dataset, UnlabeledImageFolder) and len(dataset) == 2 and dataset.num_classes == 0
    assert [p.name for p in dataset.files] == ["b.png", "a.jpg"]  # sorted by full path
    assert [dataset[i][1] for i in range(2)] == [-1, -1]
    assert dataset[1][0].shape == (3, 32, 32)  # grayscale jpg comes out RGB


def test_train_folder_without_classes_is_unlabelled(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "unrelated").mkdir()
    _noise_image(tmp_path / "unrelated" / "x.png", seed=0)  # outside train/: not read
    for i in range(3):
        _noise_image(tmp_path / "train" / f"{i}.png", seed=i)
    dataset = build_dataset("imagefolder", str(tmp_path), "train", None)
    assert len(dataset) == 3 and dataset.num_classes == 0
    img, label = dataset[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and label == -1


def test_an_extracted_archives_top_folder_is_entered(tmp_path):
    # tar -xzf cifar10-jpg.tar.gz -C data: data/cifar10-jpg/{train,test}; reading data/ itself as one folder
    # would pre-train on the test images too
    for split, count in (("train", 3), ("test", 2)):
        (tmp_path / "cifar10-jpg" / split / "cat").mkdir(parents=True)
        for i in range(count):
            _noise_image(tmp_path / "cifar10-jpg" / split / "cat" / f"{i}.png", seed=i)
    train = build_dataset("imagefolder", str(tmp_path), "train", None)
    val = build_dataset("imagefolder", str(tmp_path), "val", None)
    assert (len(train), len(val)) == (3, 2) and train.classes == ["cat"]


# ---------------------------------------------------------------- errors


def test_missing_path_empty_folder_and_unknown_names(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"--data_path.*{re.escape(str(missing))}"):
        build_dataset("imagefolder", str(missing), "train", None)
    (tmp_path / "train" / "empty_class").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=f"no images found in {re.escape(str(tmp_path / 'train'))}"):
        build_dataset("imagefolder", str(tmp_path), "train", None)
    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(tmp_path))}.*val/ or test/"):
        build_dataset("imagefolder", str(tmp_path), "val", None)
    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(tmp_path / 'cifar-10-batches-py'))}.*never downloads"):
        build_dataset("cifar10", str(tmp_path), "train", None)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "cifar-100-python"))):
        build_dataset("cifar100", str(tmp_path), "val", None)
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        build_dataset("fashion_mnist", str(tmp_path), "train", None)
    with pytest.raises(ValueError, match="unknown dataset 'imagenet22k'.*" + ".*".join(DATASETS)):
        build_dataset("imagenet22k", str(tmp_path), "train", None)
    with pytest.raises(ValueError, match="split"):
        build_dataset("imagefolder", str(tmp_path), "test", None)


def test_split_layouts_without_train_are_refused_not_read_as_one_folder(tmp_path):
    (tmp_path / "test" / "cat").mkdir(parents=True)
    _noise_image(tmp_path / "test" / "cat" / "0.png", seed=0)
    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(tmp_path))}.*has test/ but no train/"):
        build_dataset("imagefolder", str(tmp_path), "train", None)
    two = tmp_path / "two"
    for name in ("a", "b"):
        (two / name / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="2 sub-folders with one \\(a, b\\)"):
        build_dataset("imagefolder", str(two), "train", None)


# ---------------------------------------------------------------- Fashion-MNIST IDX


def _write_idx(path: Path, array: np.ndarray, magic: int, gz: bool = True) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _write_fashion_mnist(root: Path, n_train: int = 6, n_test: int = 4, gz: bool = True) -> dict:
    rng = np.random.default_rng(0)
    arrays = {}
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        arrays[prefix] = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8), rng.integers(0, 10, n).astype(np.uint8)
        _write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", arrays[prefix][0], 2051, gz)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", arrays[prefix][1], 2049, gz)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_round_trip(tmp_path, gz):
    arrays = _write_fashion_mnist(tmp_path, gz=gz)
    for split, prefix in (("train", "train"), ("val", "t10k")):
        dataset = build_dataset("fashion_mnist", str(tmp_path), split, TO_TENSOR)
        images, labels = arrays[prefix]
        assert len(dataset) == len(images) and dataset.num_classes == 10
        for i in range(len(images)):
            img, label = dataset[i]
            assert type(label) is int and label == labels[i]
            assert img.shape == (3, 28, 28)
            expected = torch.from_numpy(images[i]).float() / 255
            assert all(torch.equal(img[c], expected) for c in range(3))
    raw, _ = build_dataset("fashion_mnist", str(tmp_path), "train", None)[0]
    assert raw.mode == "RGB" and np.array_equal(np.asarray(raw)[..., 1], arrays["train"][0][0])


def test_fashion_mnist_bad_files_name_the_file(tmp_path):
    arrays = _write_fashion_mnist(tmp_path)
    labels_file = tmp_path / "train-labels-idx1-ubyte.gz"
    _write_idx(labels_file, arrays["train"][0], 2051)  # images where labels belong: wrong magic
    with pytest.raises(ValueError, match=f"{re.escape(str(labels_file))}.*magic 2051, expected 2049"):
        build_dataset("fashion_mnist", str(tmp_path), "train", None)
    _write_idx(labels_file, arrays["train"][1][:5], 2049)  # one label short
    with pytest.raises(ValueError, match=f"{re.escape(str(labels_file))}: 5 labels"):
        build_dataset("fashion_mnist", str(tmp_path), "train", None)
    images_file = tmp_path / "t10k-images-idx3-ubyte.gz"
    with gzip.open(images_file, "rb") as f:
        data = f.read()
    with gzip.open(images_file, "wb") as f:
        f.write(data[:-1])  # truncated payload
    with pytest.raises(ValueError, match=f"{re.escape(str(images_file))}: IDX size mismatch"):
        build_dataset("fashion_mnist", str(tmp_path), "val", None)


def test_real_fashion_mnist_if_installed():
    if not (REAL_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST IDX files not found in {REAL_FASHION_MNIST} (Debian package dataset-fashion-mnist)")
    train, test = (build_dataset("fashion_mnist", str(REAL_FASHION_MNIST), split, None) for split in ("train", "val"))
    assert (len(train), len(test)) == (60000, 10000)
    assert train.images.shape == (60000, 28, 28) and train.images.dtype == np.uint8
    assert np.bincount(test.labels).tolist() == [1000] * 10  # the test set is balanced
    img, label = test[0]
    assert img.size == (28, 28) and img.mode == "RGB" and 0 <= label < 10


# ---------------------------------------------------------------- CIFAR pickles


def _fake_cifar(root: Path, hundred: bool = False) -> np.ndarray:
    """torchvision's python layout with 2 images per file; returns the first test image (H, W, 3)."""
    rng = np.random.default_rng(0)
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir()
    names = ["train", "test"] if hundred else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        data = rng.integers(0, 256, (2, 3072)).astype(np.uint8)
        batch = {"data": data, ("fine_labels" if hundred else "labels"): [i, 99 if hundred else 9]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    meta = {"fine_label_names": [str(i) for i in range(100)]} if hundred else {"label_names": [str(i) for i in range(10)]}
    with open(folder / ("meta" if hundred else "batches.meta"), "wb") as f:
        pickle.dump(meta, f)
    return data[0].reshape(3, 32, 32).transpose(1, 2, 0)  # last file written is the test one


def test_cifar10_pickles(tmp_path, monkeypatch):
    first_test_image = _fake_cifar(tmp_path)
    with pytest.raises(FileNotFoundError, match="corrupted.*nothing is downloaded"):  # fake files fail the checksums
        build_dataset("cifar10", str(tmp_path), "train", TO_TENSOR)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    train = build_dataset("cifar10", str(tmp_path), "train", TO_TENSOR)
    val = build_dataset("cifar10", str(tmp_path), "val", None)
    assert (len(train), len(val)) == (10, 2) and train.num_classes == val.num_classes == 10
    assert [train[i][1] for i in range(0, 10, 2)] == [0, 1, 2, 3, 4] and train[1][1] == 9
    assert train[0][0].shape == (3, 32, 32)
    img, label = val[0]
    assert img.mode == "RGB" and label == 5 and np.array_equal(np.asarray(img), first_test_image)


def test_cifar100_pickles(tmp_path, monkeypatch):
    _fake_cifar(tmp_path, hundred=True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    train = build_dataset("cifar100", str(tmp_path), "train", TO_TENSOR)
    assert len(train) == 2 and train.num_classes == 100 and train[1][1] == 99


# ---------------------------------------------------------------- SeededDataset


def _seeded(root: Path, noise_size: int = 16, n: int = 12) -> SeededDataset:
    """One image copied n times under a random transform: any difference between samples is the augmentation."""
    if not (root / "x00.png").exists():
        _noise_image(root / "x00.png", seed=0)
        for i in range(1, n):
            (root / f"x{i:02d}.png").write_bytes((root / "x00.png").read_bytes())
    base = build_dataset("imagefolder", str(root), "train", build_transform(True, 16, "pretrain"))
    return SeededDataset(base, seed=5, noise_size=noise_size)


def test_seeded_samples_depend_only_on_seed_epoch_and_index(tmp_path):
    first, second = _seeded(tmp_path), _seeded(tmp_path)
    a = first[3]
    _ = second[7], second[0], torch.rand(5)  # other accesses and draws in between change nothing
    b = second[3]
    assert torch.equal(a[0], b[0]) and a[1] == b[1] == -1 and torch.equal(a[2], b[2])
    assert not torch.equal(first[4][0], a[0])  # same image file, other index: other crop
    assert not torch.equal(first[4][2], a[2])
    second.set_epoch(1)
    c = second[3]
    assert not torch.equal(c[0], a[0]) and not torch.equal(c[2], a[2])
    second.set_epoch(0)
    assert torch.equal(second[3][0], a[0])
    assert not torch.equal(SeededDataset(first.dataset, seed=6, noise_size=16)[3][2], a[2])


def test_seeded_noise_shape_range_and_passthrough(tmp_path):
    dataset = _seeded(tmp_path, noise_size=64)
    noise = torch.stack([dataset[i][2] for i in range(len(dataset))])
    assert noise.shape == (12, 64) and noise.dtype == torch.float32
    assert noise.min() >= 0 and noise.max() < 1 and noise.unique(dim=0).shape[0] == 12
    assert dataset.num_classes == 0 and len(dataset) == 12
    plain = SeededDataset(dataset.dataset, seed=5)
    assert len(plain[0]) == 2 and torch.equal(plain[3][0], dataset[3][0])  # the noise does not shift the crop


def test_seeded_forwards_num_classes(tmp_path):
    _write_fashion_mnist(tmp_path)
    assert SeededDataset(build_dataset("fashion_mnist", str(tmp_path), "train", None), seed=0).num_classes == 10


def test_seeded_loading_leaves_global_rngs_alone(tmp_path):
    dataset = _seeded(tmp_path)
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    expected = torch.rand(3), random.random(), np.random.rand()
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    _ = dataset[0], dataset[1]
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1] and np.random.rand() == expected[2]


def test_batches_do_not_depend_on_worker_count(tmp_path):
    dataset = _seeded(tmp_path)
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        runs = [list(DataLoader(dataset, batch_size=4, num_workers=workers)) for workers in (0, 2)]
        assert len(runs[0]) == len(runs[1]) == 3
        for x, y in zip(*runs):
            assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and torch.equal(x[2], y[2])
        if epoch == 0:
            epoch0 = runs[0]
    assert not torch.equal(epoch0[0][0], runs[0][0][0])  # set_epoch reached the workers


# ---------------------------------------------------------------- transforms


def test_transforms_sizes_and_denormalize():
    gray = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50)).astype(np.uint8)).convert("RGB")
    for kind in ("pretrain", "linprobe", "finetune"):
        assert build_transform(False, 32, kind)(gray).shape == (3, 32, 32)
    assert build_transform(True, 24, "pretrain")(gray).shape == (3, 24, 24)
    assert build_transform(True, 24, "linprobe")(gray).shape == (3, 24, 24)
    small_eval = build_transform(False, 32, "finetune")
    assert not any(isinstance(t, transforms.CenterCrop) for t in small_eval.transforms)  # 32 px: no crop
    big_eval = build_transform(False, 224, "finetune")
    assert big_eval.transforms[0].size == 256 and big_eval.transforms[1].size == (224, 224)
    args = argparse.Namespace(color_jitter=None, aa="rand-m9-mstd0.5-inc1", reprob=0.25, remode="pixel", recount=1)
    assert build_transform(True, 32, "finetune", args)(gray).shape == (3, 32, 32)
    assert build_transform(True, 32, "finetune", args).transforms[0].scale == (0.08, 1.0)  # timm's and MAE's
    args.crop_scale = (0.5, 1.0)  # main_finetune.py --crop_scale 0.5 1
    assert build_transform(True, 32, "finetune", args).transforms[0].scale == (0.5, 1.0)
    with pytest.raises(ValueError, match="args"):
        build_transform(True, 32, "finetune")
    with pytest.raises(ValueError, match="unknown transform kind 'simclr'"):
        build_transform(True, 32, "simclr")
    x = TO_TENSOR(gray.resize((8, 8))).unsqueeze(0).repeat(2, 1, 1, 1)
    normalized = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)(x)
    assert not torch.allclose(normalized, x)
    assert torch.allclose(denormalize(normalized), x, atol=1e-6)


def test_subset_is_fixed_and_keeps_num_classes(tmp_path):
    dataset = _seeded(tmp_path).dataset
    a, b = subset(dataset, 5, seed=1), subset(dataset, 5, seed=1)
    assert a.indices == b.indices and len(set(a.indices)) == 5 and a.num_classes == 0
    assert subset(dataset, 0, seed=1) is dataset and subset(dataset, 100, seed=1) is dataset


def test_finetune_randaugment_survives_zero_bit_posterize():
    """MAE's RandAugment keeps 0 bits when posterize is drawn at level 10 (the magnitude noise reaches it); Pillow
    >= 11 refuses 0 bits, so the fine-tuning transform crashed. Now 0 bits give a black image, as PIL once did,
    and other levels are timm's posterize unchanged."""
    from PIL import ImageOps
    from timm.data.auto_augment import RandAugment

    from util.datasets import posterize_keeping_zero_bits

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8))
    assert np.array(posterize_keeping_zero_bits(image, 0)).max() == 0
    assert np.array_equal(np.array(posterize_keeping_zero_bits(image, 2)), np.array(ImageOps.posterize(image, 2)))
    # magnitude 10 without noise: every posterize drawn keeps 0 bits; 8 operations per image draw it often
    args = argparse.Namespace(color_jitter=None, aa="rand-m10-n8-mstd0-inc1", reprob=0.0, remode="pixel", recount=1)
    transform = build_transform(True, 32, "finetune", args)
    randaugment = next(t for t in transform.transforms if isinstance(t, RandAugment))
    posterizes = [op for op in randaugment.ops if op.name == "PosterizeIncreasing"]
    assert posterizes and all(op.aug_fn is posterize_keeping_zero_bits for op in posterizes)
    random.seed(0)
    np.random.seed(0)
    for _ in range(50):
        assert transform(image).shape == (3, 32, 32)
