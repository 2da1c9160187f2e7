"""Datasets and transforms. Nothing is ever downloaded: every dataset is read from a local folder.

- imagefolder: `train/` and `val/` (or `test/`) class folders (ImageNet, the CIFAR-10 JPEG copy); a folder
  without class sub-folders is read as unlabelled images (labels -1), enough for pre-training.
- fashion_mnist: the standard IDX files (`train-images-idx3-ubyte.gz`, ...), e.g. Debian's
  dataset-fashion-mnist under /usr/share/datasets/fashion-mnist.
- cifar10 / cifar100: torchvision's python pickles (`cifar-10-batches-py/`, `cifar-100-python/`).
Every dataset hands its transform an RGB PIL image (grayscale repeated to 3 channels) and has `num_classes`
(0 when unlabelled).
"""
import gzip
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DATASETS = ("imagefolder", "fashion_mnist", "cifar10", "cifar100")
TRANSFORM_KINDS = ("pretrain", "linprobe", "finetune")

Transform = Callable | None


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMG_EXTENSIONS and path.is_file()


def _load_rgb(path: str) -> Image.Image:
    """ImageFolder's loader: a module-level function (unlike a lambda) pickles into spawned workers."""
    with Image.open(path) as img:
        return img.convert("RGB")


class UnlabeledImageFolder(Dataset):
    """Every image under `root` (recursively, sorted), label -1: pre-training needs no class folders."""

    num_classes = 0

    def __init__(self, root: Path, transform: Transform = None):
        self.files = sorted(p for p in Path(root).rglob("*") if _is_image(p))
        if not self.files:
            raise FileNotFoundError(f"no images found in {root} (looked for {', '.join(IMG_EXTENSIONS)} files)")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        img = _load_rgb(str(self.files[index]))
        return (self.transform(img) if self.transform else img), -1


class ArrayImageDataset(Dataset):
    """Images held in memory as uint8 (N, H, W[, C]) with integer labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int, transform: Transform = None):
        self.images, self.labels, self.num_classes, self.transform = images, labels, num_classes, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.images[index]).convert("RGB")
        return (self.transform(img) if self.transform else img), int(self.labels[index])


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Read an IDX file (gzipped or not): magic 2051 for uint8 images (N, H, W), 2049 for uint8 labels (N,).

    The magic number encodes the dtype (0x08: uint8) and the number of dimensions, so comparing it whole
    checks both; the header's big-endian dimensions must account for every byte that follows.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if magic != expected_magic:
        raise ValueError(f"{path}: not an IDX file of the expected kind (magic {magic}, expected {expected_magic})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: IDX header truncated ({len(data)} bytes, {ndim} dimensions announced)")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    payload = np.frombuffer(data, dtype=np.uint8, offset=header)
    if payload.size != int(np.prod(dims)):
        raise ValueError(f"{path}: IDX size mismatch ({payload.size} values, header says {dims})")
    return payload.reshape(dims)


def _idx_file(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"{root}: missing {stem}.gz (or {stem}); the standard Fashion-MNIST IDX files are expected")


def fashion_mnist(root: Path, split: str, transform: Transform) -> ArrayImageDataset:
    """Fashion-MNIST's "train" (60000) or "val" = t10k (10000) split, 28x28 grayscale, 10 classes."""
    prefix = "train" if split == "train" else "t10k"
    images_file, labels_file = (_idx_file(root, f"{prefix}-{kind}") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"))
    images, labels = read_idx(images_file, 2051), read_idx(labels_file, 2049)
    if len(images) != len(labels):
        raise ValueError(f"{labels_file}: {len(labels)} labels but {images_file} holds {len(images)} images")
    if labels.size and labels.max() >= 10:
        raise ValueError(f"{labels_file}: label {labels.max()} out of range for Fashion-MNIST's 10 classes")
    return ArrayImageDataset(images, labels.astype(np.int64), 10, transform)


def _cifar(name: str, root: Path, split: str, transform: Transform) -> Dataset:
    folder, cls, num_classes = {
        "cifar10": ("cifar-10-batches-py", datasets.CIFAR10, 10),
        "cifar100": ("cifar-100-python", datasets.CIFAR100, 100),
    }[name]
    if not (root / folder).is_dir():
        raise FileNotFoundError(f"{root / folder} not found: --dataset {name} reads torchvision's python version "
                                f"from --data_path and never downloads it")
    try:
        dataset = cls(str(root), train=split == "train", transform=transform, download=False)
    except RuntimeError as err:  # torchvision's checksum failure, whose message suggests download=True
        raise FileNotFoundError(f"{root / folder}: files missing or corrupted (torchvision's checksums differ); "
                                f"nothing is downloaded") from err
    dataset.num_classes = num_classes
    return dataset


def _image_folder(root: Path, split: str, transform: Transform) -> Dataset:
    """Train reads `root/train` if present, else `root` itself; val reads `root/val`, else `root/test`.

    The chosen folder is labelled (torchvision's ImageFolder, one class per sub-folder) when its sub-folders hold
    the images. With images lying directly in it, or no sub-folder holding any, every image under it is read
    unlabelled (label -1), which is all pre-training needs.
    """
    if split == "train":
        folder = root / "train" if (root / "train").is_dir() else root
    else:
        folder = next((root / name for name in ("val", "test") if (root / name).is_dir()), None)
        if folder is None:
            raise FileNotFoundError(f"--data_path {str(root)!r} has no val/ or test/ folder for evaluation")
    loose_images = any(_is_image(f) for f in folder.iterdir())
    if loose_images or not any(d.is_dir() and any(_is_image(f) for f in d.rglob("*")) for d in folder.iterdir()):
        return UnlabeledImageFolder(folder, transform)
    dataset = datasets.ImageFolder(str(folder), transform=transform, loader=_load_rgb)
    dataset.num_classes = len(dataset.classes)
    return dataset


def build_dataset(name: str, data_path: str, split: str, transform: Transform) -> Dataset:
    """The `split` ("train" or "val") of dataset `name` under `data_path`, yielding (transform(RGB image), int label)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    root = Path(data_path)
    if not root.is_dir():
        raise FileNotFoundError(f"--data_path {data_path!r} does not exist or is not a folder")
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


@contextmanager
def _global_rngs_seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator, `random` and NumPy's global RNG, which torchvision and timm transforms draw
    from. In the main process (num_workers=0) they are restored afterwards, so that the training loop's
    randomness is what it would be with workers; a worker's own state matters to nobody, and saving NumPy's
    costs ~0.1 ms a sample. Only the CPU generator: torch.manual_seed would also reseed every GPU."""
    in_main_process = torch.utils.data.get_worker_info() is None
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state()) if in_main_process else None
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        if states is not None:
            torch.set_rng_state(states[0])
            random.setstate(states[1])
            np.random.set_state(states[2])


class SeededDataset(Dataset):
    """Every sample's randomness (augmentation, mask noise) is a function of (seed, epoch, index) only.

    Runs therefore resume exactly and give the same samples whatever the number of ranks or workers.
    The epoch is a plain attribute that reaches the workers when each epoch's iterator pickles the dataset,
    so the DataLoader must not use persistent workers (they would keep the epoch they started with).
    With `noise_size > 0` a sample is (img, label, noise): uniform noise in [0, 1) of that length, which the
    model's masking argsorts (the model's `noise_per_sample`: L for MAE, N * L for MI-MAE's independent masks).
    """

    def __init__(self, dataset: Dataset, seed: int, noise_size: int = 0):
        self.dataset, self.seed, self.epoch, self.noise_size = dataset, seed, 0, noise_size
        self.num_classes = getattr(dataset, "num_classes", 0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        # Two independent 63-bit seeds: one for the transforms, one for the noise, so masks don't shift when
        # the augmentation changes how many random numbers it draws.
        transform_seed, noise_seed = (
            int(s) for s in np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(2, np.uint64) >> 1)
        with _global_rngs_seeded(transform_seed):
            img, label = self.dataset[index]
        if not self.noise_size:
            return img, label
        return img, label, torch.rand(self.noise_size, generator=torch.Generator().manual_seed(noise_seed))


def build_transform(is_train: bool, input_size: int, kind: str, args=None) -> Callable:
    """MAE's transforms for `kind`:

    - "pretrain": random resized crop (scale 0.2-1, bicubic) + flip, MAE's pre-training augmentation;
    - "linprobe": random resized crop (scale 0.08-1) + flip;
    - "finetune": timm's RandAugment, colour jitter and random erasing from `args` (color_jitter, aa, reprob,
      remode, recount).
    Evaluation is the same for every kind: resize to input_size / 0.875 and centre-crop at >= 224 px; below that,
    resize straight to input_size, since cropping 12.5% off a 32 px image cuts into the object.
    """
    if kind not in TRANSFORM_KINDS:
        raise ValueError(f"unknown transform kind {kind!r}; choose one of {', '.join(TRANSFORM_KINDS)}")
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    bicubic = transforms.InterpolationMode.BICUBIC
    if is_train and kind in ("pretrain", "linprobe"):
        scale = (0.2, 1.0) if kind == "pretrain" else (0.08, 1.0)
        return transforms.Compose([
            transforms.RandomResizedCrop(input_size, scale=scale, interpolation=bicubic),
            transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize])
    if is_train:
        if args is None:
            raise ValueError("the finetune training transform needs args (color_jitter, aa, reprob, remode, recount)")
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
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return x * std + mean
