"""tools/info_plane.py: each estimator against data of known mutual information, and the tool end to end."""
import json
import math

import pytest
import torch

from tools import info_plane

ESTIMATED = ("i_xz", "i_xz_gaussian", "i_zz", "club_within_image", "fresh_v_gain")


def _correlated(rho: float, n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """z = rho x + sqrt(1 - rho^2) eps per feature: I(x; z) = -dim log(1 - rho^2) / 2, CLUB = dim rho^2 / (1 - rho^2)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=generator)
    return x, rho * x + math.sqrt(1 - rho**2) * torch.randn(n, dim, generator=generator)


@pytest.mark.parametrize("rho", [0.0, 0.7])
def test_club_with_a_fresh_v_on_correlated_gaussians(rho):
    fit, held = _correlated(rho, 6000, 3, seed=0), _correlated(rho, 3000, 3, seed=1)
    estimates = info_plane.club_fresh_v(*fit, *held, group=4)
    true_mi = -0.5 * math.log(1 - rho**2)
    if rho == 0.0:
        assert all(abs(v) < 0.03 for v in estimates.values())
    else:  # per feature: CLUB's closed form, which bounds the true MI from above
        assert estimates["club"] == pytest.approx(rho**2 / (1 - rho**2), rel=0.15)
        assert estimates["club"] > true_mi
        # negatives from groups of 4 (the pair itself included): 3/4 of CLUB
        assert estimates["club_within"] == pytest.approx(0.75 * rho**2 / (1 - rho**2), rel=0.15)
        # the gain of a fitted Gaussian V over one that ignores x is the MI itself for Gaussians
        assert estimates["v_gain"] == pytest.approx(true_mi, rel=0.1)


def test_club_with_a_fresh_v_is_scale_free():
    fit, held = _correlated(0.7, 4000, 3, seed=0), _correlated(0.7, 2000, 3, seed=1)
    base = info_plane.club_fresh_v(*fit, *held)
    scaled = info_plane.club_fresh_v(fit[0], 0.01 * fit[1], held[0], 0.01 * held[1])
    assert scaled["club"] == pytest.approx(base["club"], rel=1e-3)
    assert scaled["v_gain"] == pytest.approx(base["v_gain"], rel=1e-3)


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
def test_linear_gaussian_estimate_is_the_closed_form(rho):
    estimate = info_plane.linear_gaussian_mi(*_correlated(rho, 20000, 4, seed=0), *_correlated(rho, 20000, 4, seed=1))
    assert estimate == pytest.approx(-0.5 * math.log(1 - rho**2), abs=0.01)


def test_linear_gaussian_estimate_under_a_mixing_matrix():
    """MI is invariant to invertible maps of z: mixing the features must not change the estimate."""
    x_fit, z_fit = _correlated(0.8, 20000, 3, seed=0)
    x_eval, z_eval = _correlated(0.8, 20000, 3, seed=1)
    mix = torch.tensor([[2.0, 0.5, 0.0], [0.0, 1.0, -1.0], [0.3, 0.0, 0.1]])
    assert info_plane.linear_gaussian_mi(x_fit, z_fit @ mix, x_eval, z_eval @ mix) == pytest.approx(
        -0.5 * math.log(1 - 0.64), abs=0.01)


@pytest.mark.parametrize("rho", [0.0, 0.6, 0.95])
def test_heldout_info_nce_is_a_lower_bound(rho):
    """Views (n, 2, d) of correlated Gaussians: 0 <= bound <= min(true MI, log K), and close to it when MI is small."""
    def views(seed, n):
        generator = torch.Generator().manual_seed(seed)
        shared = torch.randn(n, 8, generator=generator)
        noise = torch.randn(n, 2, 8, generator=generator)
        return math.sqrt(rho) * shared[:, None] + math.sqrt(1 - rho) * noise  # corr(view0, view1) = rho per feature

    bound = info_plane.heldout_info_nce(views(0, 512), views(1, 256))
    true_mi = -8 * 0.5 * math.log(1 - rho**2)
    if rho == 0.0:
        assert abs(bound) < 0.1
    else:
        assert bound < min(true_mi, math.log(256))
        assert bound > (0.4 if rho == 0.6 else 0.6) * min(true_mi, math.log(256))


def test_info_plane_end_to_end(tmp_path, tiny_imagefolder):
    """Two epochs of a one-block MI-MAE and a MAE: a JSON record per checkpoint, and the plot."""
    from tests.conftest import run_script

    runs = []
    for name, model in (("mi", "mi_mae_vit_tiny_patch4"), ("mae", "mae_vit_tiny_patch4")):
        out = tmp_path / name
        run_script(["tests/pretrain_worker.py", "--model", model, "--data_path", str(tiny_imagefolder), "--input_size", "32",
                    "--batch_size", "8", "--epochs", "2", "--warmup_epochs", "1", "--save_freq", "1", "--device", "cpu",
                    "--num_workers", "0", "--vis_freq", "0", "--output_dir", str(out)])
        runs.append(str(out))
    results = info_plane.main(["--runs", *runs, "--labels", "MI-MAE", "MAE", "--data_path", str(tiny_imagefolder),
                               "--input_size", "32", "--fit_images", "6", "--eval_images", "2",
                               "--output_dir", str(tmp_path / "plane")])
    saved = json.loads((tmp_path / "plane" / "info_plane.json").read_text())
    assert saved == json.loads(json.dumps(results))
    for label in ("MI-MAE", "MAE"):
        assert [r["epoch"] for r in saved[label]] == [0, 1]
        for record in saved[label]:
            assert record["estimators"] == info_plane.ESTIMATORS
            assert all(math.isfinite(record[k]) for k in ESTIMATED)
            assert record["i_zz"] <= math.log(2) + 1e-6 and record["train_rec"] > 0
    assert (tmp_path / "plane" / "info_plane.png").stat().st_size > 10000
