"""Reconstruction grids in un-normalised pixels: original, masked input, reconstruction (visible patches pasted)."""
import torch
from torchvision.utils import make_grid

from util.datasets import denormalize
from util.mim import patchify, unpatchify


@torch.no_grad()
def reconstruction_grid(model, imgs: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """A (3, H', W') image grid with three rows: originals, masked inputs, reconstructions; values in [0, 1].

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
    return make_grid(torch.cat(rows).clamp(0, 1).cpu(), nrow=imgs.shape[0], padding=1)
