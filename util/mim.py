"""Pure tensor functions of masked image modeling: patchify, masking and the reconstruction loss.

Shapes: B batch, C channels, p patch size, h = w = H / p, L = h * w patches, P = p * p * C values per patch.
"""
from typing import NamedTuple

import torch


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), each patch flattened as (p, p, C), row-major over the patch grid (MAE order)."""
    batch, channels, height, width = imgs.shape
    if height != width or height % patch_size:
        raise ValueError(f"patchify needs square images divisible by patch {patch_size}, got {height}x{width}")
    grid = height // patch_size
    x = imgs.reshape(batch, channels, grid, patch_size, grid, patch_size)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(batch, grid * grid, patch_size * patch_size * channels)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int = 3) -> torch.Tensor:
    """(B, L, p*p*C) -> (B, C, H, W); the inverse of `patchify`."""
    batch, num_patches, _ = patches.shape
    grid = int(num_patches**0.5)
    if grid * grid != num_patches:
        raise ValueError(f"unpatchify needs a square number of patches, got {num_patches}")
    x = patches.reshape(batch, grid, grid, patch_size, patch_size, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(batch, channels, grid * patch_size, grid * patch_size)


class Masking(NamedTuple):
    """Result of `random_masking`.

    ids_keep: (B, len_keep) indices of the visible patches, in shuffled order.
    mask: (B, L) float, 1 = removed, 0 = kept, in the original patch order.
    ids_restore: (B, L) inverse permutation of ids_shuffle: gather(shuffled, ids_restore) restores the order.
    """

    ids_keep: torch.Tensor
    mask: torch.Tensor
    ids_restore: torch.Tensor


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Patches kept per image: floor(L * (1 - mask_ratio)), as in MAE."""
    return int(num_patches * (1 - mask_ratio))


def random_masking(noise: torch.Tensor, mask_ratio: float) -> Masking:
    """MAE's per-sample masking from uniform noise (B, L): keep the len_keep patches with the smallest noise."""
    batch, num_patches = noise.shape
    len_keep = num_visible(num_patches, mask_ratio)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, num_patches, device=noise.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return Masking(ids_shuffle[:, :len_keep], mask, ids_restore)


def gather_tokens(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Select tokens (B, L, D) at indices ids (B, K) -> (B, K, D)."""
    return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def normalize_patches(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch normalisation of the target (B, L, P): (t - mean) / sqrt(unbiased var + eps)."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)  # unbiased, as MAE
    return (target - mean) / (var + eps) ** 0.5


def masked_mse_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MAE loss: sum_{b,p} m_bp * mean_P (pred - target)^2 / sum m; kept patches (m = 0) do not count."""
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


def check_num_masks(num_patches: int, num_masks: int, mask_ratio: float) -> None:
    """N disjoint visible sets of floor(L(1-r)) patches need N * floor(L(1-r)) <= L (integers: 1/(1-0.8) is 4.999...)."""
    if num_masks < 1:
        raise ValueError(f"--num_masks must be at least 1, got {num_masks}")
    len_keep = num_visible(num_patches, mask_ratio)
    if num_masks * len_keep > num_patches:
        raise ValueError(
            f"--num_masks {num_masks} orthogonal masks of {len_keep} visible patches need {num_masks * len_keep} "
            f"patches but the image has {num_patches}; with --mask_ratio {mask_ratio} at most "
            f"{num_patches // len_keep} fit (raise --mask_ratio or use --mask_mode independent)"
        )


def orthogonal_mask_noise(noise: torch.Tensor, num_masks: int, mask_ratio: float) -> torch.Tensor:
    """(B, L) uniform noise -> (B, N, L) noise for N disjoint masks of one image.

    With pi = argsort(noise) and n = floor(L(1-r)), mask k keeps pi[k*n:(k+1)*n]: its noise is the patch's
    rank in pi shifted by k*n (mod L), so `random_masking` on it keeps exactly that slice.
    """
    num_patches = noise.shape[1]
    check_num_masks(num_patches, num_masks, mask_ratio)
    ranks = torch.argsort(torch.argsort(noise, dim=1), dim=1)
    shifts = torch.arange(num_masks, device=noise.device) * num_visible(num_patches, mask_ratio)
    return ((ranks[:, None, :] - shifts[None, :, None]) % num_patches).float()
