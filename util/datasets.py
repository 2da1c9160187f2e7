"""Datasets and transforms. Nothing is ever downloaded: every dataset is read from a local folder.

- imagefolder: `train/` and `val/` (or `test/`) class folders (ImageNet, the CIFAR-10 JPEG copy); a folder
  without class sub-folders is read as unlabelled images (labels -1), enough for pre-training.
- fashion_mnist: the standard IDX files (`train-images-idx3-ubyte.gz`, ...), e.g. Debian's
  dataset-fashion-mnist under /usr/share/datasets/fashion-mnist.
- cifar10 / cifar100: torchvision's python pickles (`cifar-10-batches-py/`, `cifar-100-python/`).
- tiny_imagenet: the official `tiny-imagenet-200/` folder (train/<wnid>/images/, val/ labelled by val_annotations.txt).
Every dataset hands its transform an RGB PIL image (grayscale repeated to 3 channels) and has `num_classes`
(0 when unlabelled).
"""
import gzip
import math
import random
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DATASETS = ("imagefolder", "fashion_mnist", "cifar10", "cifar100", "tiny_imagenet")
TRANSFORM_KINDS = ("pretrain", "linprobe", "finetune")

Transform = Callable | None


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMG_EXTENSIONS and path.is_file()


class BadImageError(OSError):
    """An image file that cannot be decoded (corrupt, truncated, empty, not an image); the message names it.

    The message comes first and alone suffices, so that an error raised in a DataLoader worker is re-raised as
    this type (the DataLoader rebuilds it from its message)."""

    def __init__(self, message: str, path: str = "", reason: str = ""):
        super().__init__(message)
        self.path, self.reason = path, reason

    @classmethod
    def for_file(cls, path: str, err: BaseException) -> "BadImageError":
        return cls(f"cannot read image {path}: {err}. Delete or replace the file, or pre-train with "
                   f"--skip_bad_images to use another sample in its place", path, str(err))


def load_rgb(path: str, source=None) -> Image.Image:
    """ImageFolder's loader: a module-level function (unlike a lambda) pickles into spawned workers. `source` (a
    file object) is read instead of `path`, which still names the file in errors.

    Decoding happens here (convert), so a bad file fails at its first read with a BadImageError naming it."""
    try:
        with Image.open(path if source is None else source) as img:
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadImageError.for_file(path, err) from err


def loader_for(transform: Transform) -> Callable[[str], object]:
    """The file loader a transform wants: the file's bytes for one that decodes them itself (--data_pipeline fast,
    util/fast_augment.py), else the decoded RGB PIL image."""
    if getattr(transform, "reads_encoded", False):
        from util.fast_augment import read_encoded

        return read_encoded
    return load_rgb


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
        img = loader_for(self.transform)(str(self.files[index]))
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


class LabelledImageFiles(Dataset):
    """Image files with integer labels, decoded to RGB when read."""

    def __init__(self, samples: list[tuple[Path, int]], num_classes: int, transform: Transform = None):
        self.samples, self.num_classes, self.transform = samples, num_classes, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        img = loader_for(self.transform)(str(path))
        return (self.transform(img) if self.transform else img), label


def tiny_imagenet(root: Path, split: str, transform: Transform) -> LabelledImageFiles:
    """Tiny-ImageNet-200 in its official layout, `root` being `tiny-imagenet-200/` or the folder holding it.

    train: train/<wnid>/images/*.JPEG (500 per class); val: val/images/*.JPEG, labelled by val/val_annotations.txt
    (file<TAB>wnid<TAB>box, 10,000 lines). Classes are the train/ folders in sorted order (ImageFolder's); the
    test/ split has no public labels, so "val" is the evaluation split.
    """
    if not (root / "train").is_dir() and (root / "tiny-imagenet-200").is_dir():
        root = root / "tiny-imagenet-200"
    train = root / "train"
    if not train.is_dir():
        raise FileNotFoundError(f"--data_path {str(root)!r} has no train/ folder: --dataset tiny_imagenet expects the "
                                f"official tiny-imagenet-200 layout (train/<wnid>/images/*.JPEG, val/images/, "
                                f"val/val_annotations.txt)")
    wnids = sorted(d.name for d in train.iterdir() if d.is_dir())
    classes = {wnid: label for label, wnid in enumerate(wnids)}
    if split == "train":
        samples = [(p, classes[w]) for w in wnids for p in sorted((train / w / "images").glob("*")) if _is_image(p)]
    else:
        annotations = root / "val" / "val_annotations.txt"
        if not annotations.is_file():
            raise FileNotFoundError(f"{annotations} not found: Tiny-ImageNet's val images are labelled by that file")
        samples = []
        for number, line in enumerate(annotations.read_text().splitlines(), 1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2:
                raise ValueError(f"{annotations}, line {number}: expected 'file<TAB>wnid<TAB>box', got {line!r}")
            if fields[1] not in classes:
                raise ValueError(f"{annotations}, line {number}: class {fields[1]} has no folder in {train}")
            path = root / "val" / "images" / fields[0]
            if not path.is_file():
                raise FileNotFoundError(f"{annotations}, line {number}: {path} does not exist")
            samples.append((path, classes[fields[1]]))
    if not samples:
        raise FileNotFoundError(f"no {split} images found under {root} (looked for {', '.join(IMG_EXTENSIONS)} files)")
    return LabelledImageFiles(samples, len(wnids), transform)


def _image_folder(root: Path, split: str, transform: Transform) -> Dataset:
    """Train reads `root/train` if present, else `root` itself; val reads `root/val`, else `root/test`.

    A `root` without train/ whose one sub-folder has it (an extracted archive's top folder: `tar -xzf
    cifar10-jpg.tar.gz -C data` gives data/cifar10-jpg/train) is read as that sub-folder. The chosen folder is
    labelled (torchvision's ImageFolder, one class per sub-folder) when its sub-folders hold the images. With
    images lying directly in it, or no sub-folder holding any, every image under it is read unlabelled (label -1),
    which is all pre-training needs.
    """
    if not (root / "train").is_dir():
        nested = sorted(d for d in root.iterdir() if d.is_dir() and (d / "train").is_dir())
        if len(nested) > 1:
            raise FileNotFoundError(f"--data_path {str(root)!r} has no train/ folder but {len(nested)} sub-folders with one "
                                    f"({', '.join(d.name for d in nested)}): give one of them as --data_path")
        root = nested[0] if nested else root
    if split == "train":
        held_out = [name for name in ("val", "test") if (root / name).is_dir()]
        if held_out and not (root / "train").is_dir():
            # read as one unlabelled folder, root would put the evaluation images into pre-training
            raise FileNotFoundError(f"--data_path {str(root)!r} has {'/ and '.join(held_out)}/ but no train/ folder: "
                                    "add the training images as train/, or give a folder of training images only")
        folder = root / "train" if (root / "train").is_dir() else root
    else:
        folder = next((root / name for name in ("val", "test") if (root / name).is_dir()), None)
        if folder is None:
            raise FileNotFoundError(f"--data_path {str(root)!r} has no val/ or test/ folder for evaluation")
    loose_images = any(_is_image(f) for f in folder.iterdir())
    if loose_images or not any(d.is_dir() and any(_is_image(f) for f in d.rglob("*")) for d in folder.iterdir()):
        return UnlabeledImageFolder(folder, transform)
    dataset = datasets.ImageFolder(str(folder), transform=transform, loader=loader_for(transform))
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
    if name == "tiny_imagenet":
        return tiny_imagenet(root, split, transform)
    return _image_folder(root, split, transform)


def subset(dataset: Dataset, size: int, seed: int) -> Dataset:
    """A fixed random subset of `size` samples (all when size <= 0 or larger than the dataset)."""
    if size <= 0 or size >= len(dataset):
        return dataset
    indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:size]
    chosen = torch.utils.data.Subset(dataset, indices.tolist())
    chosen.num_classes = dataset.num_classes
    return chosen


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """The integer label of every sample (N,), in index order, without decoding an image where the dataset
    keeps its labels (ImageFolder, CIFAR, Fashion-MNIST, Tiny-ImageNet, unlabelled folders, Subset and wrappers
    of these); any other dataset is read sample by sample."""
    if isinstance(dataset, torch.utils.data.Subset):
        return dataset_labels(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    if isinstance(dataset, ArrayImageDataset):
        return np.asarray(dataset.labels, dtype=np.int64)
    if isinstance(dataset, UnlabeledImageFolder):
        return np.full(len(dataset), -1, dtype=np.int64)
    if isinstance(dataset, LabelledImageFiles):
        return np.array([label for _, label in dataset.samples], dtype=np.int64)
    if isinstance(getattr(dataset, "targets", None), (list, np.ndarray, torch.Tensor)):  # ImageFolder, CIFAR
        return np.asarray(dataset.targets, dtype=np.int64)
    if isinstance(dataset, (SeededDataset, SkipBadImages)):
        return dataset_labels(dataset.dataset)
    return np.array([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)


def images_per_class(fraction: float, count: int) -> int:
    """round(fraction x count), halves rounded up, computed on the decimal value of `fraction` as written
    (0.15 x 10 = 1.5 keeps 2, where float arithmetic gives 1.4999... and Python's round() rounds 2.5 to 2)."""
    exact = Fraction(repr(float(fraction))) * count
    return int(math.floor(exact + Fraction(1, 2)))


def class_balanced_subset(dataset: Dataset, fraction: float, seed: int) -> Dataset:
    """The same `fraction` of every class: round(fraction x n_c) images (halves up, `images_per_class`) of each
    class c with n_c > 0 images, the first ones of a random order of that class's images drawn from
    (seed, c) alone. The choice thus depends only on the labels, the fraction and the seed (never on a model or
    a transform), and for one seed a smaller fraction's images are part of a larger one's. Samples keep the
    dataset's order. Raises ValueError, naming the class, when a class would keep no image, and when the
    dataset has no labels."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"--label_fraction must lie in (0, 1], got {fraction}")
    labels = dataset_labels(dataset)
    if labels.size == 0 or (labels < 0).all():
        raise ValueError(f"--label_fraction {fraction} selects images per class, but the training set has no labels "
                         f"(no class folders)")
    names = getattr(dataset, "classes", None)
    classes, counts = np.unique(labels[labels >= 0], return_counts=True)
    empty = [(count, label) for label, count in zip(classes, counts) if images_per_class(fraction, count) == 0]
    if empty:
        count, label = min(empty)  # the smallest class: the one a larger fraction must serve
        name = f" ({names[label]!r})" if names is not None and label < len(names) else ""
        others = {1: ""}.get(len(empty), f" (and {len(empty) - 1} other class{'es' if len(empty) > 2 else ''})")
        raise ValueError(
            f"--label_fraction {fraction} keeps round({fraction} x {count}) = 0 images of class {label}{name}{others}, "
            f"which has {count} training images; every class needs at least one: use --label_fraction >= "
            f"{math.ceil(0.5 / count * 1e6) / 1e6:g} (0.5 / {count}, for the smallest class), or more data")
    chosen = []
    for label in classes:
        members = np.flatnonzero(labels == label)
        order = np.random.default_rng(np.random.SeedSequence([seed, int(label)])).permutation(len(members))
        chosen.append(members[order[:images_per_class(fraction, len(members))]])
    indices = np.sort(np.concatenate(chosen))
    subset_ = torch.utils.data.Subset(dataset, indices.tolist())
    subset_.num_classes = getattr(dataset, "num_classes", 0)
    if names is not None:
        subset_.classes = names
    return subset_


class SkipBadImages(Dataset):
    """`dataset` with every unreadable image replaced by the next readable sample (index + 1, + 2, ...,
    cyclically): an epoch keeps its length, and the replacement depends on the index only, so a run stays
    reproducible whatever the number of workers or restarts.

    DataLoader workers are other processes, so what they find is kept in shared memory (forked and spawned
    workers alike write into the main process's tensors): flags of known bad files, so that each is reported
    once (on stderr, from every rank), and per-index replacement counts, which the main process sums for the
    log. An index is loaded by one worker at a time, so its count needs no lock.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.num_classes = getattr(dataset, "num_classes", 0)
        self.known_bad = torch.zeros(len(dataset), dtype=torch.bool).share_memory_()
        self.replaced = torch.zeros(len(dataset), dtype=torch.int64).share_memory_()
        self.counted = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            if self.known_bad[candidate]:
                continue
            try:
                sample = self.dataset[candidate]
            except BadImageError as err:
                self.known_bad[candidate] = True
                sys.stderr.write(f"--skip_bad_images: skipping {err.path} ({err.reason})\n")
                sys.stderr.flush()
                continue
            if offset:
                self.replaced[index] += 1
            return sample
        raise BadImageError(f"none of the {len(self)} images can be read")

    def new_replacements(self) -> int:
        """Samples replaced (by this process and its workers) since the previous call."""
        total = int(self.replaced.sum())
        new, self.counted = total - self.counted, total
        return new


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


def posterize_keeping_zero_bits(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, where 0 bits kept gives a black image, as PIL gave before Pillow 11 refused 0 bits.
    MAE's RandAugment ('rand-m9-mstd0.5-inc1') keeps 4 - int(level x 0.4) bits, so 0 at level 10, which the
    magnitude noise reaches in a few images per thousand: with Pillow 13 fine-tuning crashed in its first epoch."""
    from timm.data.auto_augment import posterize

    return Image.new(img.mode, img.size) if bits_to_keep <= 0 else posterize(img, bits_to_keep)


def with_zero_bit_posterize(transform: Callable) -> Callable:
    """`transform` (timm's training Compose) with posterize_keeping_zero_bits in its RandAugment, AutoAugment or
    AugMix operations."""
    from timm.data.auto_augment import posterize

    for step in getattr(transform, "transforms", [transform]):
        operations = [*getattr(step, "ops", []), *(op for policy in getattr(step, "policy", []) for op in policy)]
        for operation in operations:
            if getattr(operation, "aug_fn", None) is posterize:
                operation.aug_fn = posterize_keeping_zero_bits
    return transform


def build_transform(is_train: bool, input_size: int, kind: str, args=None, fast: bool = False) -> Callable:
    """MAE's transforms for `kind`:

    - "pretrain": random resized crop (scale 0.2-1, bicubic) + flip, MAE's pre-training augmentation; with `fast`,
      the same on uint8 tensors (util/fast_augment.py: uint8 out, normalised on the device);
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
    if is_train and kind == "pretrain" and fast:
        from util.fast_augment import FastRandomResizedCropFlip

        return FastRandomResizedCropFlip(input_size, scale=(0.2, 1.0))
    if is_train and kind in ("pretrain", "linprobe"):
        scale = (0.2, 1.0) if kind == "pretrain" else (0.08, 1.0)
        return transforms.Compose([
            transforms.RandomResizedCrop(input_size, scale=scale, interpolation=bicubic),
            transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize])
    if is_train:
        if args is None:
            raise ValueError("the finetune training transform needs args (color_jitter, aa, reprob, remode, recount)")
        from timm.data import create_transform

        return with_zero_bit_posterize(create_transform(
            input_size=input_size, is_training=True, scale=tuple(getattr(args, "crop_scale", (0.08, 1.0))),
            color_jitter=args.color_jitter, auto_augment=args.aa or None,
            interpolation="bicubic", re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
            mean=IMAGENET_MEAN, std=IMAGENET_STD))
    if input_size >= 224:
        resize = [transforms.Resize(int(input_size / 0.875), interpolation=bicubic), transforms.CenterCrop(input_size)]
    else:
        resize = [transforms.Resize((input_size, input_size), interpolation=bicubic)]
    return transforms.Compose([*resize, transforms.ToTensor(), normalize])


class TrainData:
    """A method's training samples and its work between epochs; main_pretrain calls these hooks for every method.

    This base is MAE's: one augmented view per image (`build_transform`'s "pretrain"), nothing between epochs, no
    state. A method with other samples subclasses it and names the subclass in its registry Method.train_data
    (CMAE: two ContrastiveCrop views and their boxes, util/contrastive_crop.py).
    """

    def __init__(self, args):
        self.args = args

    def image_transform(self) -> Transform:
        """What build_dataset applies to each image (MAE's augmentation; uint8 out with --data_pipeline fast)."""
        # Only image files gain (their decode is the cost); the in-memory sets (Fashion-MNIST, CIFAR) keep PIL's
        # path: there the fast path made 2-worker CPU training 1.6x slower (6.5 against 10.3 images/s, not yet
        # explained; equal with 0 workers).
        files = getattr(self.args, "dataset", "imagefolder") in ("imagefolder", "tiny_imagenet")
        return build_transform(True, self.args.input_size, "pretrain", fast=self.args.data_pipeline == "fast" and files)

    def wrap(self, images: Dataset) -> Dataset:
        """The training set made from `images`, which yield (image_transform(img), label) in training order."""
        return images

    def start_epoch(self, epoch: int) -> None:
        """Before the epoch's first step, on every rank."""

    def end_epoch(self, epoch: int, model: torch.nn.Module, device: torch.device,
                  amp_context: Callable) -> dict[str, float]:
        """After the epoch's last step and before its checkpoint, on every rank: entries for the epoch's log line."""
        return {}

    def state_dict(self) -> dict:
        """Plain-typed state for the checkpoint, restored on resume by `load_state_dict`."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict`'s output; raises ValueError if it does not fit this run."""


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation of (B, 3, H, W) images, for display."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return x * std + mean
