"""Fixed 2-D sin-cos positional embeddings and resizing of learned/fixed ones for checkpoints."""
import math

import torch
import torch.nn.functional as F


def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Sin-cos embedding of 1-D positions: (M,) -> (M, embed_dim); half sin, half cos, omega_i = 10000^(-2i/D)."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(embed_dim: int, grid_size: int, cls_token: bool = False) -> torch.Tensor:
    """2-D sin-cos table (grid_size**2 [+1], embed_dim), float32, as in MAE.

    The first half of the channels encodes the column (w), the second half the row (h),
    matching MAE's `get_2d_sincos_pos_embed`; the cls row, if asked for, is zero.
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {embed_dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")  # grid_w varies along columns
    table = torch.cat([sincos_1d(embed_dim // 2, grid_w), sincos_1d(embed_dim // 2, grid_h)], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), table], dim=0)
    return table.float()


def interpolate_pos_embed(pos_embed: torch.Tensor, num_patches: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Resize a (1, prefix + H*W, D) position table to (1, prefix + num_patches, D) by bicubic interpolation.

    Used when a checkpoint trained at one resolution is loaded at another; prefix (cls) rows are kept.
    """
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old_size, new_size = math.isqrt(grid.shape[1]), math.isqrt(num_patches)
    if old_size**2 != grid.shape[1] or new_size**2 != num_patches:
        raise ValueError(f"position tables must be square grids, got {grid.shape[1]} -> {num_patches} patches")
    if old_size == new_size:
        return pos_embed
    dim = grid.shape[-1]
    grid = grid.reshape(1, old_size, old_size, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_size, new_size), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_size * new_size, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)
