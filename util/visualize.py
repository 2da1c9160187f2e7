"""Reconstruction grids in un-normalised pixels: original, masked input, reconstruction (visible patches pasted).

Small images are enlarged by an integer factor with nearest neighbour (pixels stay pixels) to at least
`MIN_TILE` px a tile, and each row is labelled on its left, so the PNG and the TensorBoard image read alike.
"""
import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

from util.datasets import denormalize
from util.mim import patchify, unpatchify

MIN_TILE = 96  # px: a 32-px image is shown at 96
ROW_LABELS = ("original", "masked", "reconstruction")
PADDING = 2  # px between tiles (black)


def upscale_factor(side: int, min_side: int = MIN_TILE) -> int:
    """The smallest integer factor that brings `side` to at least `min_side` (1 for images already that large)."""
    return max(1, math.ceil(min_side / side))


def label_strip(labels: tuple[str, ...], row_height: int, padding: int) -> torch.Tensor:
    """A (3, H, W) white strip with each label in black, centred on its row of a grid with this row height and
    padding (H = rows x (row_height + padding) + padding, make_grid's layout)."""
    font = ImageFont.load_default(size=max(12, row_height // 6))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = max(6, row_height // 12)
    width = max(int(math.ceil(measure.textlength(label, font=font))) for label in labels) + 2 * margin
    height = len(labels) * (row_height + padding) + padding
    strip = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(strip)
    for row, label in enumerate(labels):
        centre = padding + row * (row_height + padding) + row_height / 2
        draw.text((margin, centre), label, fill="black", font=font, anchor="lm")
    return torch.from_numpy(np.asarray(strip).copy()).permute(2, 0, 1).float() / 255


def labelled_grid(rows: list[torch.Tensor], labels: tuple[str, ...] = ROW_LABELS) -> torch.Tensor:
    """Rows of (B, 3, H, W) images in [0, 1] -> one (3, H', W') grid: tiles enlarged to >= MIN_TILE px by nearest
    neighbour, one grid row per entry of `rows`, the labels in a strip on the left."""
    if len(rows) != len(labels):
        raise ValueError(f"{len(rows)} rows of images but {len(labels)} labels")
    factor = upscale_factor(min(rows[0].shape[-2:]))
    tiles = torch.cat(rows).clamp(0, 1).float().cpu()
    tiles = tiles.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    grid = make_grid(tiles, nrow=rows[0].shape[0], padding=PADDING)
    strip = label_strip(labels, tiles.shape[-2], PADDING)
    return torch.cat([strip, grid], dim=2)


@torch.no_grad()
def reconstruction_grid(model, imgs: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """A (3, H', W') labelled grid with three rows: originals, masked inputs, reconstructions; values in [0, 1].

    With norm_pix_loss the prediction is in per-patch normalised units and is mapped back with each patch's
    own mean and std before display (otherwise reconstructions look like noise, mae #190).
    """
    was_training = model.training
    model.eval()
    pred, mask = model.reconstruct(imgs, noise)
    model.train(was_training)
    patch_size, channels = model.patch_size, imgs.shape[1]
    target = patchify(imgs, patch_size)
    pred = pred.float()
    if model.norm_pix_loss:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    keep = (1 - mask).unsqueeze(-1)
    masked = unpatchify(target * keep, patch_size, channels)
    pasted = unpatchify(target * keep + pred * (1 - keep), patch_size, channels)
    rows = [denormalize(imgs), denormalize(masked) * unpatchify(keep.expand_as(target), patch_size, channels),
            denormalize(pasted)]
    return labelled_grid([row.float() for row in rows])
