"""Masking, patchify and the MAE loss against independent computations."""
import numpy as np
import pytest
import torch

from util.mim import masked_mse_loss, normalize_patches, num_visible, patchify, random_masking, unpatchify
from util.pos_embed import interpolate_pos_embed, sincos_2d


@pytest.mark.parametrize("mask_ratio", [0.5, 0.75, 0.9])
def test_random_masking_invariants(mask_ratio):
    torch.manual_seed(0)
    batch, num_patches = 5, 64
    masking = random_masking(torch.rand(batch, num_patches), mask_ratio)
    len_keep = int(num_patches * (1 - mask_ratio))
    assert masking.ids_keep.shape == (batch, len_keep)
    # exactly L*(1-r) kept per row, and the kept ids are where the mask is 0
    assert torch.equal((masking.mask == 0).sum(1), torch.full((batch,), len_keep))
    for b in range(batch):
        kept = set(masking.ids_keep[b].tolist())
        assert kept == set(torch.nonzero(masking.mask[b] == 0).flatten().tolist())
        assert len(kept) == len_keep


def test_ids_restore_inverts_ids_shuffle():
    noise = torch.rand(3, 49)
    masking = random_masking(noise, 0.75)
    ids_shuffle = torch.argsort(noise, dim=1)
    restored = torch.gather(ids_shuffle, 1, masking.ids_restore)
    assert torch.equal(restored, torch.arange(49).expand(3, -1))
    # the kept patches are those with the smallest noise
    smallest = noise.topk(num_visible(49, 0.75), dim=1, largest=False).indices.sort(1).values
    assert torch.equal(masking.ids_keep.sort(1).values, smallest)


def test_patchify_matches_loop_and_round_trips():
    imgs = torch.randn(2, 3, 12, 12)
    p = 4
    patches = patchify(imgs, p)
    assert patches.shape == (2, 9, p * p * 3)
    # patch (i, j) flattened as (row, col, channel), row-major over the grid
    for b in range(2):
        for i in range(3):
            for j in range(3):
                block = imgs[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p].permute(1, 2, 0).reshape(-1)
                assert torch.equal(patches[b, i * 3 + j], block)
    assert torch.equal(unpatchify(patches, p, 3), imgs)


def test_patchify_rejects_indivisible_size():
    with pytest.raises(ValueError, match="divisible"):
        patchify(torch.randn(1, 3, 10, 10), 4)


def test_loss_against_hand_computation():
    torch.manual_seed(1)
    pred, target = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    mask = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1]])
    expected = 0.0
    for b in range(2):
        for p in range(4):
            if mask[b, p]:
                expected += sum((pred[b, p, k] - target[b, p, k]).item() ** 2 for k in range(6)) / 6
    expected /= 3
    assert masked_mse_loss(pred, target, mask).item() == pytest.approx(expected, rel=1e-6)


def test_norm_pix_uses_unbiased_variance():
    x = torch.randn(1, 2, 5)
    values = x[0, 0].tolist()
    mean = sum(values) / 5
    var = sum((v - mean) ** 2 for v in values) / 4
    expected = [(v - mean) / (var + 1e-6) ** 0.5 for v in values]
    assert normalize_patches(x)[0, 0].tolist() == pytest.approx(expected, rel=1e-5)


def test_sincos_matches_numpy_formula():
    dim, grid = 16, 3
    table = sincos_2d(dim, grid, cls_token=True).numpy()
    assert np.all(table[0] == 0)

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2) / (d / 2))
        angles = np.outer(pos, omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    rows, cols = np.divmod(np.arange(grid * grid), grid)  # patch index = row * grid + col
    expected = np.concatenate([one_d(dim // 2, cols), one_d(dim // 2, rows)], axis=1)  # MAE: column half first
    np.testing.assert_allclose(table[1:], expected, atol=1e-6)


def test_interpolate_pos_embed_keeps_cls_and_same_size():
    table = torch.randn(1, 1 + 16, 8)
    assert interpolate_pos_embed(table, 16) is table
    resized = interpolate_pos_embed(table, 64)
    assert resized.shape == (1, 65, 8) and torch.equal(resized[:, 0], table[:, 0])
    constant = torch.ones(1, 17, 8)
    assert torch.allclose(interpolate_pos_embed(constant, 36)[:, 1:], torch.ones(1, 36, 8), atol=1e-5)
