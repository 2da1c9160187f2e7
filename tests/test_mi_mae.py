"""MI-MAE: masks, InfoNCE, CLUB and gradient routing, against independent computations."""
import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from models_mi_mae import GaussianVariationalNet
from util.mi_losses import (
    club_upper_bound,
    club_upper_bound_sampled,
    gaussian_log_likelihood,
    marginal_gaussian_nll,
    multi_positive_info_nce,
    standardize,
)
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
        sampled = club_upper_bound_sampled(z, mu, logvar, generator=torch.Generator().manual_seed(0)).item()
        assert sampled == pytest.approx(closed_form, rel=0.15)
        # the same pairs in groups of 4, partners drawn from every group ("all") rather than within each
        grouped = [t.reshape(-1, 4, t.shape[-1]) for t in (z, mu, logvar)]
        across = club_upper_bound_sampled(*grouped, "all", generator=torch.Generator().manual_seed(0)).item()
        assert across == pytest.approx(closed_form, rel=0.15)


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
    # negatives "all": every latent of every group (the batch marginal), against the 14 x 14 log q table
    flat = [t.reshape(14, 3) for t in (z, mu, logvar)]
    table = gaussian_log_likelihood(flat[0][None, :, :], flat[1][:, None, :], flat[2][:, None, :])  # [a, b]
    expected_all = (table.diagonal() - table.mean(1)).mean().item()
    assert club_upper_bound(z, mu, logvar, "all").item() == pytest.approx(expected_all, rel=1e-5)
    assert club_upper_bound(*(t.reshape(1, 14, 3) for t in (z, mu, logvar))).item() == pytest.approx(expected_all, rel=1e-5)


def _model(**kwargs):
    torch.manual_seed(0)
    return create_model("mi_mae_vit_tiny_patch4", norm_pix_loss=True, **kwargs)


def _grads(model, prefix):
    return [p.grad for n, p in model.named_parameters() if n.startswith(prefix)]


@pytest.mark.parametrize("club_dir", ["z_given_x", "x_given_z"])
def test_gradient_routing_between_encoder_and_v(club_dir):
    """The bound's gradient reaches the encoder (through z) and never V; V's NLL reaches V and never z."""
    model = _model(club_dir=club_dir)
    x, z = torch.randn(2, 16, 48), torch.randn(2, 16, 192, requires_grad=True)
    terms = model.min_mi_terms(x, z)
    terms["min_mi"].backward(retain_graph=True)
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.variational.parameters())
    z.grad = None
    terms["v_nll"].backward()
    assert z.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.variational.mu.parameters())


def test_zero_weight_terms_build_no_heads():
    """A head outside the graph would stop DDP's reduction; an untrained one would log noise."""
    control = _model(w_max=0.0, w_min=0.0, w_v=0.0)
    assert control.mi_projector is None and control.variational is None
    out = control(torch.randn(2, 3, 32, 32))
    assert set(out.terms) == {"rec", "latent_std"}
    max_only = _model(w_min=0.0, w_v=0.0)
    assert max_only.variational is None and max_only.mi_projector is not None
    min_only = _model(w_max=0.0)
    assert min_only.mi_projector is None and "min_mi" in min_only(torch.randn(2, 3, 32, 32)).terms
    estimator_only = _model(w_min=0.0)  # V trained on detached latents: the CLUB estimate is logged, not optimised
    out = estimator_only(torch.randn(2, 3, 32, 32))
    assert {"min_mi", "v_gain", "v_nll"} <= set(out.terms)
    assert out.loss.item() == pytest.approx((out.terms["rec"] + out.terms["max_mi"] + out.terms["v_nll"]).item(), rel=1e-5)
    with pytest.raises(ValueError, match="--w_min > 0 needs --w_v > 0"):
        _model(w_v=0.0)


def test_v_gain_is_zero_for_a_v_that_ignores_x_and_positive_when_it_predicts():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4000, 4, generator=generator)
    z = standardize(0.8 * x + 0.6 * torch.randn(1, 4000, 4, generator=generator))
    blind = -gaussian_log_likelihood(z, z.mean((0, 1)).expand_as(z), z.var((0, 1), unbiased=False).log().expand_as(z)).mean()
    assert marginal_gaussian_nll(z).item() == pytest.approx(blind.item(), abs=1e-5)
    informed = -gaussian_log_likelihood(z, 0.8 * x, torch.full_like(z, math.log(0.36))).mean()
    # closed form: the gain of the true conditional is I(x; z) per feature = -log(1 - 0.8^2) / 2
    assert (marginal_gaussian_nll(z) - informed).item() == pytest.approx(-0.5 * math.log(0.36), rel=0.05)


def test_bound_is_unchanged_when_z_is_scaled():
    """Standardised z: the same pairs at any scale give the same V fit and the same bound, so the encoder
    cannot lower it by shrinking its latents; without standardisation a bounded V cannot follow a small z."""
    generator = torch.Generator().manual_seed(1)
    x, z = _correlated(0.6, 4000, generator)
    estimates = {}
    for scale in (1.0, 0.05, 20.0):
        net = _fit_v(x, standardize(scale * z))  # V refitted to the scaled latents
        with torch.no_grad():
            mu, logvar = net(x)
        estimates[scale] = club_upper_bound(standardize(scale * z), mu, logvar).item()
    assert estimates[0.05] == pytest.approx(estimates[1.0], rel=1e-3)
    assert estimates[20.0] == pytest.approx(estimates[1.0], rel=1e-3)
    raw = {}
    for scale in (1.0, 0.05):  # raw z, log sigma^2 bounded to (-1, 1): shrinking z lowers the "bound"
        net = _fit_v(x, scale * z)
        with torch.no_grad():
            mu, logvar = net(x)
        raw[scale] = club_upper_bound(scale * z, mu, logvar).item()
    assert raw[0.05] < 0.1 * raw[1.0]


@pytest.mark.parametrize("rho", [0.0, 0.6])
def test_mask_level_club_on_correlated_gaussians(rho):
    """The submission's form: groups of N = 4 (x_j, z_j) pairs, each contrasted with the N latents of its group
    (itself included), so the estimate is (N - 1) / N of CLUB's rho^2 / (1 - rho^2), still above I(x; z)."""
    generator = torch.Generator().manual_seed(2)
    num_masks = 4
    net = _fit_v(*_correlated(rho, 8000, generator))
    x, z = _correlated(rho, 8000, generator)
    with torch.no_grad():
        mu, logvar = net(x)
    grouped = [t.reshape(-1, num_masks, t.shape[-1]) for t in (z, mu, logvar)]
    estimate = club_upper_bound(*grouped).item()
    if rho == 0.0:
        assert abs(estimate) < 0.02
        return
    closed_form, true_mi = (num_masks - 1) / num_masks * rho**2 / (1 - rho**2), -0.5 * math.log(1 - rho**2)
    assert estimate == pytest.approx(closed_form, rel=0.15)
    assert estimate > true_mi
    # --club_candidates batch: every row a negative, CLUB itself
    assert club_upper_bound(*grouped, "all").item() == pytest.approx(rho**2 / (1 - rho**2), rel=0.15)


def test_mask_level_pairs_are_pooled_per_mask():
    model = _model(club_level="mask")
    images, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 64)
    masking = random_masking(model.mask_noise(noise), model.mask_ratio)
    tokens = model.embed_patches(images).repeat_interleave(4, dim=0)
    latent = model.encode(tokens, masking.ids_keep)
    x, z = model.club_pairs(tokens, None, latent, masking, 3)
    assert x.shape == (3, 4, 192) and z.shape == (3, 4, 192)
    row = 1 * 4 + 2  # image 1, mask 2
    assert torch.allclose(x[1, 2], tokens[row, masking.ids_keep[row]].mean(0), atol=1e-6)
    assert torch.allclose(z[1, 2], latent[row, 1:].mean(0), atol=1e-6)
    assert _model(club_level="mask", club_candidates="batch").club_negatives == "all"
    out = model(images, noise)
    assert torch.isfinite(out.loss) and {"min_mi", "v_gain"} <= set(out.terms)


def test_v_steps_update_only_v():
    from engine_pretrain import PretrainTask, estimator_steps

    model = _model(v_steps=3)
    task = PretrainTask(model)
    optimizer = torch.optim.AdamW(model.param_groups(0.05), lr=1e-3)
    model(torch.randn(2, 3, 32, 32)).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    estimator_steps(task, optimizer)
    changed = {name for name, p in model.named_parameters() if not torch.equal(before[name], p)}
    assert changed and all(name.startswith("variational.") for name in changed)
    v_param = next(model.variational.parameters())
    assert optimizer.state[v_param]["step"].item() == 4  # the main step and 3 extra ones
    assert model._v_pairs is None and list(model.estimator_losses()) == []  # each step's pairs are used once


@pytest.mark.parametrize("schedule", ["constant", "cosine", "warmup_cosine"])
def test_v_has_its_own_lr_and_schedule(schedule):
    from util.lr_sched import adjust_learning_rate

    model = _model(v_lr_scale=10.0, v_lr_schedule=schedule)
    optimizer = torch.optim.AdamW(model.param_groups(0.05), lr=1.0)
    args = argparse.Namespace(lr=1e-3, min_lr=0.0, warmup_epochs=2, epochs=10)
    v_group = next(g for g in optimizer.param_groups if g.get("name") == "variational")
    for epoch in (0.5, 6.0):
        main_lr = adjust_learning_rate(optimizer, epoch, args)
        cosine = 1e-3 * 0.5 * (1 + math.cos(math.pi * epoch / 10))  # from epoch 0, no warm-up
        expected = {"constant": 1e-3, "cosine": cosine, "warmup_cosine": main_lr}[schedule]
        assert v_group["lr"] == pytest.approx(10 * expected)
    assert main_lr == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))


def test_an_unknown_group_schedule_is_an_error():
    from util.lr_sched import adjust_learning_rate

    optimizer = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "schedule": "linear"}], lr=1.0)
    with pytest.raises(ValueError, match="'linear'"):
        adjust_learning_rate(optimizer, 1.0, argparse.Namespace(lr=1e-3, min_lr=0.0, warmup_epochs=2, epochs=10))


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
    # lambda3 = 10 times the share that V's held-out fit earns (--club_gate; tests/test_mi_gate.py)
    gate = min(1.0, max(0.0, min(out.terms["v_gain"].item(), out.terms["min_mi"].item()) / 0.02))
    assert out.terms["club_gate"].item() == pytest.approx(gate, abs=1e-5)
    expected = out.terms["rec"] + out.terms["max_mi"] + 10 * gate * out.terms["min_mi"] + out.terms["v_nll"]
    assert out.terms["v_gain"].item() == pytest.approx(0.5 * (1 + math.log(1 / (1 + 1e-5))) - out.terms["v_nll"].item(), abs=1e-4)
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
