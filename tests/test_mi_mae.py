"""MI-MAE: masks, InfoNCE, CLUB and gradient routing, against independent computations."""
import math

import pytest
import torch
import torch.nn.functional as F

from models_mi_mae import GaussianVariationalNet
from util.mi_losses import club_upper_bound, club_upper_bound_sampled, gaussian_log_likelihood, multi_positive_info_nce
from util.mim import check_num_masks, orthogonal_mask_noise, random_masking
from util.registry import create_model


@pytest.mark.parametrize("num_patches,num_masks,ratio", [(64, 4, 0.75), (196, 4, 0.75), (64, 2, 0.75), (196, 5, 0.8)])
def test_orthogonal_masks_are_disjoint_and_cover(num_patches, num_masks, ratio):
    torch.manual_seed(0)
    batch = 3
    noise = orthogonal_mask_noise(torch.rand(batch, num_patches), num_masks, ratio)
    masking = random_masking(noise.reshape(-1, num_patches), ratio)
    visible = masking.ids_keep.reshape(batch, num_masks, -1)
    len_keep = int(num_patches * (1 - ratio))
    for i in range(batch):
        sets = [set(visible[i, k].tolist()) for k in range(num_masks)]
        assert all(len(s) == len_keep for s in sets)
        assert len(set().union(*sets)) == num_masks * len_keep  # pairwise disjoint
        if num_masks * len_keep == num_patches:
            assert set().union(*sets) == set(range(num_patches))  # N=4, r=0.75: every patch visible exactly once
    # mask k is 0 exactly on its visible set
    mask = masking.mask.reshape(batch, num_masks, num_patches)
    assert torch.equal((mask == 0).sum(-1), torch.full((batch, num_masks), len_keep))


def test_too_many_masks_is_an_error_naming_the_flags():
    with pytest.raises(ValueError, match="--num_masks 5 .*--mask_ratio 0.75"):
        check_num_masks(196, 5, 0.75)
    check_num_masks(196, 5, 0.8)  # 1/(1-0.8) = 4.999... in floats, 5 * 39 <= 196 in integers


def _info_nce_loop(u, groups, temperature):
    rows = u.shape[0]
    total = 0.0
    for a in range(rows):
        denominator = sum(math.exp(float(u[a] @ u[c]) / temperature) for c in range(rows) if c != a)
        positives = [p for p in range(rows) if p != a and groups[p] == groups[a]]
        total += -sum(math.log(math.exp(float(u[a] @ u[p]) / temperature) / denominator) for p in positives) / len(positives)
    return total / rows


def test_info_nce_equals_plain_loop():
    torch.manual_seed(0)
    u = F.normalize(torch.randn(12, 5, dtype=torch.float64), dim=1)
    groups = torch.arange(4).repeat_interleave(3)
    loss, _ = multi_positive_info_nce(u, u, groups, groups, torch.arange(12), 0.2)
    assert loss.item() == pytest.approx(_info_nce_loop(u, groups, 0.2), rel=1e-5)


def test_info_nce_extremes():
    images, masks, tau = 4, 3, 0.2
    rows, groups = images * masks, torch.arange(images).repeat_interleave(masks)
    same = F.normalize(torch.ones(rows, 8), dim=1)
    loss, _ = multi_positive_info_nce(same, same, groups, groups, torch.arange(rows), tau)
    assert loss.item() == pytest.approx(math.log(rows - 1), rel=1e-5)  # log of the candidate count
    # positives identical, images orthogonal: -log(e^(1/tau) / ((N-1) e^(1/tau) + (R-N))) -> log(N-1) as tau -> 0
    aligned = torch.eye(8)[groups]
    loss, accuracy = multi_positive_info_nce(aligned, aligned, groups, groups, torch.arange(rows), tau)
    expected = -math.log(math.exp(1 / tau) / ((masks - 1) * math.exp(1 / tau) + rows - masks))
    assert loss.item() == pytest.approx(expected, rel=1e-5) and accuracy.item() == 100.0
    assert expected - math.log(masks - 1) < 0.05


def _fit_v(x, z, steps=300):
    torch.manual_seed(0)
    net = GaussianVariationalNet(x.shape[-1], z.shape[-1], 64)
    optimizer = torch.optim.Adam(net.parameters(), lr=5e-3)
    for _ in range(steps):
        mu, logvar = net(x)
        loss = -gaussian_log_likelihood(z, mu, logvar).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net


def _correlated(rho, n, generator):
    x = torch.randn(1, n, 4, generator=generator)
    return x, rho * x + math.sqrt(1 - rho**2) * torch.randn(1, n, 4, generator=generator)


@pytest.mark.parametrize("rho", [0.0, 0.6])
def test_club_on_correlated_gaussians(rho):
    """y = rho x + sqrt(1 - rho^2) eps per dimension: CLUB -> rho^2 / (1 - rho^2) >= I = -log(1 - rho^2) / 2.

    V is fitted on one sample and the bound estimated on a fresh one, as an estimator should be."""
    generator = torch.Generator().manual_seed(1)
    net = _fit_v(*_correlated(rho, 8000, generator))
    x, z = _correlated(rho, 8000, generator)
    with torch.no_grad():
        mu, logvar = net(x)
    estimate = club_upper_bound(z, mu, logvar).item()
    if rho == 0.0:
        assert abs(estimate) < 0.02
    else:
        closed_form, true_mi = rho**2 / (1 - rho**2), -0.5 * math.log(1 - rho**2)
        assert estimate == pytest.approx(closed_form, rel=0.15)
        assert estimate > true_mi
        sampled = club_upper_bound_sampled(z, mu, logvar, torch.Generator().manual_seed(0)).item()
        assert sampled == pytest.approx(closed_form, rel=0.15)


def test_club_closed_form_equals_all_pairs():
    torch.manual_seed(0)
    z, mu, logvar = torch.randn(2, 7, 3), torch.randn(2, 7, 3), 0.3 * torch.randn(2, 7, 3)
    expected = 0.0
    for i in range(2):
        for a in range(7):
            joint = gaussian_log_likelihood(z[i, a], mu[i, a], logvar[i, a])
            marginal = torch.stack([gaussian_log_likelihood(z[i, b], mu[i, a], logvar[i, a]) for b in range(7)]).mean()
            expected += (joint - marginal).item() / 14
    assert club_upper_bound(z, mu, logvar).item() == pytest.approx(expected, rel=1e-5)


def _model(**kwargs):
    torch.manual_seed(0)
    return create_model("mi_mae_vit_tiny_patch4", norm_pix_loss=True, **kwargs)


def _grads(model, prefix):
    return [p.grad for n, p in model.named_parameters() if n.startswith(prefix)]


def test_gradient_routing_between_encoder_and_v():
    images = torch.randn(2, 3, 32, 32)
    only_min = _model(w_rec=0.0, w_max=0.0, w_min=1.0, w_v=0.0)
    only_min(images).loss.backward()
    assert all(g is None for g in _grads(only_min, "variational"))  # V is fixed inside the bound
    assert any(g is not None and g.abs().sum() > 0 for g in _grads(only_min, "blocks"))
    only_v = _model(w_rec=0.0, w_max=0.0, w_min=0.0, w_v=1.0)
    only_v(images).loss.backward()
    assert all(g is None for g in _grads(only_v, "blocks") + _grads(only_v, "patch_embed"))  # latents detached
    assert all(g is not None and g.abs().sum() > 0 for g in _grads(only_v, "variational.mu"))


def test_one_mask_without_mi_losses_is_mae():
    torch.manual_seed(0)
    mae = create_model("mae_vit_tiny_patch4", norm_pix_loss=True)
    mi = _model(num_masks=1, w_max=0.0, w_min=0.0, w_v=0.0)
    assert all(torch.equal(mae.state_dict()[k], v) for k, v in mi.state_dict().items() if k in mae.state_dict())
    images, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 64)
    assert torch.allclose(mi(images, noise).loss, mae(images, noise).loss, atol=1e-6)


def test_reconstruction_is_mae_loss_averaged_over_masks():
    model = _model()
    images, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    out = model(images, noise)
    masks = orthogonal_mask_noise(noise, 4, 0.75)
    # MAE's loss for each mask separately, averaged
    base = super(type(model), model)
    per_mask = [base.forward(images, masks[:, k]).loss for k in range(4)]
    assert out.terms["rec"].item() == pytest.approx(torch.stack(per_mask).mean().item(), rel=1e-5)
    expected = out.terms["rec"] + out.terms["max_mi"] + 10 * out.terms["min_mi"] + out.terms["v_nll"]
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_v_has_its_own_parameter_group_without_weight_decay():
    model = _model()
    groups = model.param_groups(0.05)
    v_group = [g for g in groups if g.get("name") == "variational"]
    assert len(v_group) == 1 and v_group[0]["weight_decay"] == 0.0
    v_params = set(model.variational.parameters())
    assert set(v_group[0]["params"]) == v_params
    assert not any(p in v_params for g in groups if g is not v_group[0] for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)
