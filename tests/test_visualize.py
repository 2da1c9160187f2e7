"""Reconstruction pictures: small images enlarged by nearest neighbour to >= 96 px a tile, rows labelled."""
import pytest
import torch

from util.datasets import denormalize
from util.registry import create_model
from util.visualize import MIN_TILE, PADDING, ROW_LABELS, label_strip, reconstruction_grid, upscale_factor


def test_upscale_factor_reaches_the_minimum_tile():
    assert [upscale_factor(side) for side in (28, 32, 48, 95, 96, 224)] == [4, 3, 2, 2, 1, 1]
    assert all(side * upscale_factor(side) >= MIN_TILE for side in range(1, 200))


def ink_columns(strip: torch.Tensor, top: int, bottom: int) -> torch.Tensor:
    """Indices of the columns holding dark pixels (text) between rows top and bottom."""
    return (strip[:, top:bottom].min(dim=0).values < 0.5).any(dim=0).nonzero().flatten()


@pytest.fixture(scope="module")
def grid_of_32px_images():
    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_patch4", depth=1, decoder_depth=1, norm_pix_loss=True)
    images = torch.randn(4, 3, 32, 32)
    noise = torch.rand(4, model.num_patches, generator=torch.Generator().manual_seed(0))
    return images, reconstruction_grid(model, images, noise)


def test_32px_grid_has_96px_nearest_neighbour_tiles(grid_of_32px_images):
    images, grid = grid_of_32px_images
    tile = 96
    assert grid.shape[0] == 3 and grid.shape[1] == 3 * (tile + PADDING) + PADDING
    label_width = grid.shape[2] - (4 * (tile + PADDING) + PADDING)
    assert label_width > 0
    # the second original, top row: each source pixel a 3 x 3 block of the same value
    top, left = PADDING, label_width + PADDING + (tile + PADDING)
    shown = grid[:, top:top + tile, left:left + tile]
    expected = denormalize(images)[1].clamp(0, 1).repeat_interleave(3, dim=1).repeat_interleave(3, dim=2)
    assert torch.equal(shown, expected)
    # masked row: each 4-px patch (a 12-px block) is the original's or black; mask ratio 0.75 blacks 48 of 64
    masked = grid[:, top + tile + PADDING:top + 2 * tile + PADDING, left:left + tile].reshape(3, 8, 12, 8, 12)
    shown_blocks = (masked == expected.reshape(3, 8, 12, 8, 12)).all(dim=(0, 2, 4))
    black_blocks = (masked == 0).all(dim=(0, 2, 4))
    assert torch.all(shown_blocks ^ black_blocks) and int(black_blocks.sum()) == 48


def test_rows_are_labelled_on_the_left(grid_of_32px_images):
    _, grid = grid_of_32px_images
    tile = 96
    label_width = grid.shape[2] - (4 * (tile + PADDING) + PADDING)
    strip = grid[:, :, :label_width]
    assert torch.equal(strip, label_strip(ROW_LABELS, tile, PADDING))
    widths = []
    for row in range(3):
        top = PADDING + row * (tile + PADDING)
        columns = ink_columns(strip, top, top + tile)
        assert len(columns) > 0, f"no label on row {row}"
        widths.append(int(columns[-1] - columns[0]))
        assert ink_columns(strip, top - PADDING, top).numel() == 0  # the text stays within its row
    # "reconstruction", the longest word by far, is the last row's label
    assert widths[2] > 1.4 * max(widths[0], widths[1])


def test_large_images_are_not_enlarged():
    torch.manual_seed(0)
    model = create_model("mae_vit_base_patch16", img_size=96, depth=1, decoder_depth=1)
    images = torch.randn(2, 3, 96, 96)
    grid = reconstruction_grid(model, images)
    assert grid.shape[1] == 3 * (96 + PADDING) + PADDING
