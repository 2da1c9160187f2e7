"""Datasets and transforms. Nothing is ever downloaded: every dataset is read from a local folder.

- imagefolder: `train/` and `val/` (or `test/`) class folders (ImageNet, the CIFAR-10 JPEG copy); a folder
  without class sub-folders is read as unlabelled images (labels -1), enough for pre-training.
- fashion_mnist: the standard IDX files (`train-images-idx3-ubyte.gz`, ...), e.g. Debian's
  dataset-fashion-mnist under /usr/share/datasets/fashion-mnist.
- cifar10 / cifar100: torchvision's python pickles (`cifar-10-batches-py/`, `cifar-100-python/`).
Grayscale images are repeated to 3 channels; every dataset has `num_classes` (0 when unlabelled).
"""
import gzip
import random
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DATASETS = ("imagefolder", "fashion_mnist", "cifar10", "cifar100")


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMG_EXTENSIONS


class UnlabeledImageFolder(Dataset):
    """Every image under `root` (recursively, sorted), label -1: pre-training needs no class folders."""

    num_classes = 0

    def __init__(self, root: Path, transform: Optional[Callable] = None):
        self.files = sorted(p for p in root.rglob("*") if _is_image(p))
        if not self.files:
            raise FileNotFoundError(f"no images found in {root}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        with Image.open(self.files[index]) as img:
            img = img.convert("RGB")
        return (self.transform(img) if self.transform else img), -1


class ArrayImageDataset(Dataset):
    """Images held in memory as uint8 (N, H, W[, C]) with integer labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int, transform: Optional[Callable] = None):
        self.images, self.labels, self.num_classes, self.transform = images, labels, num_classes, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.images[index]).convert("RGB")
        return (self.transform(img) if self.transform else img), int(self.labels[index])


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Read an IDX file (gzipped or not): magic 2051 for uint8 images (N, H, W), 2049 for labels (N,)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise ValueError(f"{path}: not an IDX file of the expected kind (magic {magic}, expected {expected_magic})")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    payload = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if payload.size != int(np.prod(dims)):
        raise ValueError(f"{path}: truncated IDX file ({payload.size} values, header says {dims})")
    return payload.reshape(dims)


def _idx_file(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"{root}: missing {stem}.gz (the standard Fashion-MNIST IDX files are expected)")


def fashion_mnist(root: Path, split: str, transform: Optional[Callable]) -> ArrayImageDataset:
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_idx_file(root, f"{prefix}-images-idx3-ubyte"), 2051)
    labels = read_idx(_idx_file(root, f"{prefix}-labels-idx1-ubyte"), 2049)
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels for split {split}")
    return ArrayImageDataset(images, labels.astype(np.int64), 10, transform)


def _cifar(name: str, root: Path, split: str, transform: Optional[Callable]) -> Dataset:
    folder, cls, num_classes = {
        "cifar10": ("cifar-10-batches-py", datasets.CIFAR10, 10),
        "cifar100": ("cifar-100-python", datasets.CIFAR100, 100),
    }[name]
    if not (root / folder).is_dir():
        raise FileNotFoundError(f"{root / folder} not found: --dataset {name} reads torchvision's files from "
                                f"--data_path and never downloads them")
    dataset = cls(str(root), train=split == "train", transform=transform, download=False)
    dataset.num_classes = num_classes
    return dataset


def _image_folder(root: Path, split: str, transform: Optional[Callable]) -> Dataset:
    if split == "train":
        folder = root / "train" if (root / "train").is_dir() else root
    else:
        folder = next((root / name for name in ("val", "test") if (root / name).is_dir()), None)
        if folder is None:
            raise FileNotFoundError(f"{root} has no val/ or test/ folder for evaluation")
    # Images directly in the folder, or no sub-folder holding images: unlabelled (labels -1).
    loose_images = any(_is_image(f) for f in folder.iterdir())
    class_dirs = [d for d in folder.iterdir() if d.is_dir() and any(_is_image(f) for f in d.iterdir())]
    if loose_images or not class_dirs:
        return UnlabeledImageFolder(folder, transform)
    dataset = datasets.ImageFolder(str(folder), transform=transform, loader=lambda p: Image.open(p).convert("RGB"))
    dataset.num_classes = len(dataset.classes)
    return dataset


def build_dataset(name: str, data_path: str, split: str, transform: Optional[Callable]) -> Dataset:
    """The `split` ("train" or "val") of dataset `name` under `data_path`, yielding (image, label)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    root = Path(data_path)
    if not root.is_dir():
        raise FileNotFoundError(f"--data_path {data_path!r} is not a folder")
    if name == "fashion_mnist":
        return fashion_mnist(root, split, transform)
    if name in ("cifar10", "cifar100"):
        return _cifar(name, root, split, transform)
    return _image_folder(root, split, transform)


def subset(dataset: Dataset, size: int, seed: int) -> Dataset:
    """A fixed random subset of `size` samples (all when size <= 0 or larger than the dataset)."""
    if size <= 0 or size >= len(dataset):
        return dataset
    indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:size]
    chosen = torch.utils.data.Subset(dataset, indices.tolist())
    chosen.num_classes = dataset.num_classes
    return chosen


class SeededDataset(Dataset):
    """Every sample's randomness (augmentation, mask noise) is a function of (seed, epoch, index) only.

    Runs therefore resume exactly and give the same samples whatever the number of ranks or workers.
    The epoch reaches the workers when each epoch's iterator pickles the dataset: no persistent workers.
    With `noise_size > 0` a sample also carries uniform noise (noise_size,) that the model's masks come from.
    """

    def __init__(self, dataset: Dataset, seed: int, noise_size: int = 0):
        self.dataset, self.seed, self.noise_size, self.epoch = dataset, seed, noise_size, 0
        self.num_classes = getattr(dataset, "num_classes", 0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        sample_seed = int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1, np.uint64)[0] >> 1)
        torch.manual_seed(sample_seed)
        random.seed(sample_seed)
        np.random.seed(sample_seed % 2**32)
        img, label = self.dataset[index]
        if self.noise_size:
            return img, label, torch.rand(self.noise_size)
        return img, label


def build_transform(is_train: bool, input_size: int, kind: str, args=None) -> Callable:
    """MAE's transforms. kind: "pretrain" (crop scale 0.2-1 + flip), "linprobe" (crop 0.08-1 + flip),
    "finetune" (timm's RandAug, random erasing). Evaluation resizes and centre-crops 87.5% at >= 224 px;
    at small sizes it only resizes, since cropping a 32 px image cuts the object."""
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    bicubic = transforms.InterpolationMode.BICUBIC
    if kind not in ("pretrain", "linprobe", "finetune"):
        raise ValueError(f"unknown transform kind {kind!r}")
    if is_train and kind in ("pretrain", "linprobe"):
        scale = (0.2, 1.0) if kind == "pretrain" else (0.08, 1.0)
        return transforms.Compose([
            transforms.RandomResizedCrop(input_size, scale=scale, interpolation=bicubic),
            transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize])
    if is_train:
        from timm.data import create_transform

        return create_transform(
            input_size=input_size, is_training=True, color_jitter=args.color_jitter, auto_augment=args.aa or None,
            interpolation="bicubic", re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
            mean=IMAGENET_MEAN, std=IMAGENET_STD)
    if input_size >= 224:
        resize = [transforms.Resize(int(input_size / 0.875), interpolation=bicubic), transforms.CenterCrop(input_size)]
    else:
        resize = [transforms.Resize((input_size, input_size), interpolation=bicubic)]
    return transforms.Compose([*resize, transforms.ToTensor(), normalize])


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation of (B, 3, H, W) images, for display."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return x * std + mean
