"""ContrastiveCrop (Peng et al., CVPR 2022) for CMAE (Mao et al.): crops whose centres fall inside a per-image
box around the object, the boxes found from the encoder's own patch-token heat maps (docs/methods/cmae.md).

Boxes are (top, left, bottom, right) fractions of the image, (0, 0, 1, 1) until the first update.
- `heatmap_boxes`: the boxes of a batch of heat maps (normalise, upsample, threshold). Pure.
- `box_offset`, `sample_crop_size`, `ContrastiveCrop`: the crop: RandomResizedCrop's size, then the top-left
  corner so that the centre falls in the box at a Beta(alpha, alpha) fraction of its extent.
- `BoxStore`: the (N, 4) boxes in shared memory, so that every DataLoader worker, persistent or not, reads updates.
- `ContrastiveCropViews`: the training set: two views per image, (2, C, H, W).
- `ContrastiveCropData`: the schedule (plain crops during the warm-up, box updates every few epochs), the box
  pass over the training set (one rank's share each, gathered back in dataset order) and the checkpoint state.
"""
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import transforms
from torchvision.transforms import functional as TF

from util.datasets import IMAGENET_MEAN, IMAGENET_STD, TrainData
from util.dist import gather_with_grad, get_rank, get_world_size

FULL_BOX = (0.0, 0.0, 1.0, 1.0)
Box = tuple[float, float, float, float]


def normalize_heatmaps(heat: torch.Tensor) -> torch.Tensor:
    """(N, h, w) -> (M - min M) / max(M - min M) per map, in [0, 1]; a constant map becomes all zeros."""
    flat = heat.float().flatten(1)
    shifted = flat - flat.min(dim=1, keepdim=True).values
    peak = shifted.max(dim=1, keepdim=True).values
    return (shifted / torch.where(peak > 0, peak, torch.ones_like(peak))).view_as(heat)


def heatmap_boxes(heat: torch.Tensor, size: tuple[int, int], threshold: float = 0.1) -> torch.Tensor:
    """Boxes (N, 4) = (min R / H, min C / W, max R / H, max C / W) of heat maps (N, h, w).

    Each map is normalised to [0, 1] (`normalize_heatmaps`) and upsampled bilinearly to size = (H, W);
    R = rows r with max_c M[r, c] > threshold, C = columns likewise (strictly greater). A map with no such row
    (constant, or all below the threshold) gets the full box (0, 0, 1, 1).
    """
    height, width = size
    maps = F.interpolate(normalize_heatmaps(heat).unsqueeze(1), size=(height, width), mode="bilinear",
                         align_corners=False).squeeze(1)
    rows = maps.amax(dim=2) > threshold  # (N, H)
    cols = maps.amax(dim=1) > threshold  # (N, W)
    row_index = torch.arange(height, device=heat.device).expand_as(rows)
    col_index = torch.arange(width, device=heat.device).expand_as(cols)
    top = torch.where(rows, row_index, height).amin(dim=1)
    bottom = torch.where(rows, row_index, -1).amax(dim=1)
    left = torch.where(cols, col_index, width).amin(dim=1)
    right = torch.where(cols, col_index, -1).amax(dim=1)
    boxes = torch.stack([top / height, left / width, bottom / height, right / width], dim=1).float()
    found = rows.any(dim=1) & cols.any(dim=1)
    return torch.where(found[:, None], boxes, torch.tensor(FULL_BOX, device=heat.device))


def interleave_rank_rows(gathered: torch.Tensor, world_size: int, total: int) -> torch.Tensor:
    """Rows of `world_size` ranks in rank order (W * n, ...) -> dataset order (total, ...).

    DistributedSampler without shuffling gives rank r the padded positions r, r + W, r + 2W, ...; so position
    k * W + r is row k of rank r, and the padding (repeats of the first samples) is cut off at `total`.
    """
    parts = gathered.reshape(world_size, -1, *gathered.shape[1:])
    return parts.transpose(0, 1).reshape(-1, *gathered.shape[1:])[:total]


def box_offset(extent: int, crop: int, box_lo: float, box_hi: float, beta: float) -> int:
    """Top (or left) edge of a `crop`-pixel crop of an `extent`-pixel side whose box spans [box_lo, box_hi]:

        lo = clip(floor(extent box_lo) - floor(crop / 2)),  hi = clip(floor(extent box_hi) - floor(crop / 2)),
        edge = lo + floor((hi - lo) beta),  clip to [0, extent - crop],

    so the crop's centre lies in the box (up to the clipping at the image border) at the fraction beta of its span.
    """
    def clip(value: int) -> int:
        return min(max(value, 0), extent - crop)

    lo = clip(math.floor(extent * box_lo) - crop // 2)
    hi = clip(math.floor(extent * box_hi) - crop // 2)
    return lo + math.floor((hi - lo) * beta)


def sample_crop_size(height: int, width: int, scale: tuple[float, float],
                     ratio: tuple[float, float]) -> Optional[tuple[int, int]]:
    """RandomResizedCrop's size (h, w): area fraction s ~ U(scale), log aspect ~ U(log ratio),
    w = round(sqrt(s A r)), h = round(sqrt(s A / r)); up to 10 tries, None if none fits (torch's global RNG)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(*scale).item()
        aspect = math.exp(torch.empty(1).uniform_(*log_ratio).item())
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return h, w
    return None


class ContrastiveCrop:
    """crop(img, box): a random resized crop of size `size` whose centre is drawn inside `box` by Beta(alpha, alpha)
    along each axis (alpha < 1: towards the box's edges; 1: uniform); box None: MAE's RandomResizedCrop."""

    def __init__(self, size: int, alpha: float, scale: tuple[float, float] = (0.2, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        if alpha <= 0:
            raise ValueError(f"--crop_alpha must be positive, got {alpha}")
        self.size, self.scale, self.ratio = size, scale, ratio
        self.beta = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha)))
        self.interpolation = transforms.InterpolationMode.BICUBIC
        self.plain = transforms.RandomResizedCrop(size, scale=scale, ratio=ratio, interpolation=self.interpolation)

    def get_params(self, height: int, width: int, box: Box) -> tuple[int, int, int, int]:
        """(top, left, h, w) of the crop; a centre crop of the largest allowed aspect when no size fits."""
        crop = sample_crop_size(height, width, self.scale, self.ratio)
        if crop is None:
            aspect = min(max(width / height, self.ratio[0]), self.ratio[1])
            h, w = (height, round(height * aspect)) if width / height > aspect else (round(width / aspect), width)
            return (height - h) // 2, (width - w) // 2, h, w
        h, w = crop
        top = box_offset(height, h, box[0], box[2], self.beta.sample().item())
        left = box_offset(width, w, box[1], box[3], self.beta.sample().item())
        return top, left, h, w

    def __call__(self, img, box: Optional[Box] = None):
        if box is None:
            return self.plain(img)
        top, left, h, w = self.get_params(img.height, img.width, box)
        return TF.resized_crop(img, top, left, h, w, [self.size, self.size], interpolation=self.interpolation)


class BoxStore:
    """Boxes (N, 4) and the flag that switches the crops to them, in shared memory.

    A DataLoader worker reads the main process's tensors (forked workers map the same memory, spawned ones
    receive handles to it), so an update reaches every worker at once, persistent workers included.
    """

    def __init__(self, num_images: int):
        self.boxes = torch.tensor([FULL_BOX]).repeat(num_images, 1).share_memory_()
        self.active = torch.zeros((), dtype=torch.bool).share_memory_()

    def box(self, index: int) -> Optional[Box]:
        """Image `index`'s box while ContrastiveCrop is on, else None (plain crops)."""
        return tuple(self.boxes[index].tolist()) if bool(self.active) else None

    def update(self, boxes: torch.Tensor) -> None:
        if boxes.shape != self.boxes.shape:
            raise ValueError(f"expected boxes of shape {tuple(self.boxes.shape)}, got {tuple(boxes.shape)}")
        self.boxes.copy_(boxes)  # in place: the shared memory the workers read

    def stats(self) -> dict[str, float]:
        """Means over the images of the box's area, height and width (fractions of the image)."""
        height = self.boxes[:, 2] - self.boxes[:, 0]
        width = self.boxes[:, 3] - self.boxes[:, 1]
        return {"box_area_mean": (height * width).mean().item(), "box_height_mean": height.mean().item(),
                "box_width_mean": width.mean().item()}


class ContrastiveCropViews(Dataset):
    """(PIL image, label) at index i -> ((views, C, H, W) tensor, label), each view cropped with image i's box
    (or plainly while the store is inactive), flipped with p 0.5, optionally colour-jittered, normalised."""

    def __init__(self, images: Dataset, store: BoxStore, size: int, alpha: float, views: int = 2,
                 color_jitter: bool = False, scale: tuple[float, float] = (0.2, 1.0)):
        if len(store.boxes) != len(images):
            raise ValueError(f"the box store holds {len(store.boxes)} boxes for {len(images)} images")
        self.images, self.store, self.views = images, store, views
        self.num_classes = getattr(images, "num_classes", 0)
        self.crop = ContrastiveCrop(size, alpha, scale)
        jitter = [transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                  transforms.RandomGrayscale(p=0.2)] if color_jitter else []  # SimCLR's
        self.finish = transforms.Compose([transforms.RandomHorizontalFlip(), *jitter, transforms.ToTensor(),
                                          transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        img, label = self.images[index]
        box = self.store.box(index)
        return torch.stack([self.finish(self.crop(img, box)) for _ in range(self.views)]), label


class _Transformed(Dataset):
    def __init__(self, images: Dataset, transform: Callable):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(self.images[index][0])


def default_box_epochs(epochs: int) -> int:
    """The project's reading for a ViT: warm-up and update interval of 20% of the epochs each (at least 1)."""
    return max(1, round(0.2 * epochs))


class ContrastiveCropData(TrainData):
    """Two views per image with ContrastiveCrop, for `main_pretrain`'s hooks.

    With E epochs numbered from 0: epochs < box_warmup use plain crops, later ones the boxes (all full until the
    first update); the boxes are recomputed after epoch e when e + 1 >= box_warmup, (e + 1) % box_update_freq == 0
    and e is not the last: the official schedule (1-based epochs there). `args`: input_size, epochs, batch_size,
    num_workers, contrastive_crop, crop_alpha, box_warmup, box_update_freq, box_threshold, box_heatmap,
    view_color_jitter.
    """

    def __init__(self, args):
        super().__init__(args)
        self.enabled = args.contrastive_crop
        self.warmup = args.box_warmup if args.box_warmup is not None else default_box_epochs(args.epochs)
        self.update_freq = args.box_update_freq if args.box_update_freq is not None else default_box_epochs(args.epochs)
        self.store: Optional[BoxStore] = None
        self.images: Optional[Dataset] = None
        if self.enabled:
            print(f"ContrastiveCrop: plain crops for {self.warmup} epochs, boxes updated every {self.update_freq} "
                  f"epochs from then on, alpha {args.crop_alpha}, {args.box_heatmap} heat maps, threshold {args.box_threshold}")

    def image_transform(self) -> None:
        return None  # the views are made from the PIL image, with its index's box

    def wrap(self, images: Dataset) -> Dataset:
        self.images = images
        self.store = BoxStore(len(images))
        return ContrastiveCropViews(images, self.store, self.args.input_size, self.args.crop_alpha,
                                    color_jitter=self.args.view_color_jitter)

    def uses_boxes(self, epoch: int) -> bool:
        return self.enabled and epoch >= self.warmup

    def updates_after(self, epoch: int) -> bool:
        done = epoch + 1
        return self.enabled and done >= self.warmup and done % self.update_freq == 0 and done < self.args.epochs

    def start_epoch(self, epoch: int) -> None:
        self.store.active.fill_(self.uses_boxes(epoch))

    def end_epoch(self, epoch: int, model: torch.nn.Module, device: torch.device,
                  amp_context: Callable[[], AbstractContextManager]) -> dict[str, float]:
        """Recompute the boxes when due; the log entries: box statistics and whether the boxes were updated."""
        if not self.enabled:
            return {}
        updated = self.updates_after(epoch)
        if updated:
            self.store.update(self.compute_boxes(model, device, amp_context))
        return {**self.store.stats(), "box_updated": int(updated)}

    @torch.no_grad()
    def compute_boxes(self, model: torch.nn.Module, device: torch.device,
                      amp_context: Callable[[], AbstractContextManager]) -> torch.Tensor:
        """Boxes (N, 4) of every training image from the heat maps `model.patch_heatmaps(imgs, box_heatmap)`
        (B, h, w) of the image resized to input_size (no augmentation; a plain resize keeps the box's fractions
        those of the whole image). Each rank handles every W-th image; the gathered boxes go back in dataset order."""
        size = self.args.input_size
        evaluate = transforms.Compose([
            transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        dataset = _Transformed(self.images, evaluate)
        sampler = DistributedSampler(dataset, num_replicas=get_world_size(), rank=get_rank(), shuffle=False)
        loader = DataLoader(dataset, batch_size=self.args.batch_size, sampler=sampler, num_workers=self.args.num_workers)
        was_training = model.training
        model.eval()
        boxes = []
        for imgs in loader:
            with amp_context():
                heat = model.patch_heatmaps(imgs.to(device, non_blocking=True), self.args.box_heatmap)
            boxes.append(heatmap_boxes(heat.float(), (size, size), self.args.box_threshold))
        model.train(was_training)
        return interleave_rank_rows(gather_with_grad(torch.cat(boxes)), get_world_size(), len(dataset)).cpu()

    def state_dict(self) -> dict:
        return {"boxes": self.store.boxes.clone()}

    def load_state_dict(self, state: dict) -> None:
        if "boxes" not in state:
            raise ValueError("the checkpoint holds no ContrastiveCrop boxes (train_data.boxes); it was not written by "
                             "a CMAE run")
        if state["boxes"].shape != self.store.boxes.shape:
            raise ValueError(f"the checkpoint's ContrastiveCrop boxes are for {len(state['boxes'])} images, this run "
                             f"trains on {len(self.store.boxes)}: resume with the same --subset_size and data")
        self.store.update(state["boxes"])
