"""MI-MAE's --club_gate: the min-MI weight scaled by clamp(min(v_gain, CLUB estimate) / margin, 0, 1), against
independent computations."""
import pytest
import torch

from util.mi_losses import fit_gate
from util.mim import random_masking
from util.registry import create_model


def test_fit_gate_is_the_clamped_ramp_of_the_smaller_fit_and_detached():
    v_gain = torch.tensor([-0.3, 0.05, 0.0, 0.005, 0.01, 0.02, 0.5, 0.5], dtype=torch.float64, requires_grad=True)
    club = torch.tensor([0.5, -1e-6, 0.3, 0.3, 0.04, 0.5, 0.01, 0.5], dtype=torch.float64, requires_grad=True)
    expected = [0.0, 0.0, 0.0, 0.25, 0.5, 1.0, 0.5, 1.0]  # max(0, min(1, min(g, c) / 0.02)), by hand
    gate = fit_gate(v_gain, club, 0.02)
    assert gate.tolist() == pytest.approx(expected, abs=1e-6)
    assert not gate.requires_grad and gate.dtype == torch.float32


def _model(**kwargs):
    torch.manual_seed(0)
    return create_model("mi_mae_vit_tiny_patch4", norm_pix_loss=True, **kwargs)


def _reference_gate(model, images, noise, margin):
    """The gate from V's outputs on the step's pairs, in float64: v_gain = the marginal Gaussian's NLL (per-feature
    ML variance) - V's Gaussian NLL (both without 2 pi, averaged over features); the CLUB estimate from the explicit
    table of log q(z_b | x_a) over the negatives (each image's M pairs, or with club_candidates batch all B x M of
    the batch), not the closed form."""
    captured = {}
    hook = model.variational.register_forward_hook(lambda module, args, out: captured.update(out=out))
    with torch.no_grad():
        out = model(images, noise)
        hook.remove()
        mu, logvar = (t.double() for t in captured["out"])  # (B, M, D)
        masking = random_masking(model.mask_noise(noise), model.mask_ratio)
        tokens = model.embed_patches(images).repeat_interleave(model.num_masks, dim=0)
        z = model.encode(tokens, masking.ids_keep)[:, 1:].double().reshape(mu.shape)
    flat = z.reshape(-1, z.shape[-1])
    z = (z - flat.mean(0)) / (flat.var(0, unbiased=False) + 1e-5).sqrt()  # standardised over the batch
    log_q = lambda target, m, lv: -((target - m) ** 2 / (2 * lv.exp()) + lv / 2).mean(-1)  # noqa: E731
    v_gain = (0.5 * (1 + z.reshape(-1, z.shape[-1]).var(0, unbiased=False).log())).mean() + log_q(z, mu, logvar).mean()
    if model.club_candidates == "batch":
        z, mu, logvar = (t.reshape(1, -1, t.shape[-1]) for t in (z, mu, logvar))
    table = log_q(z[:, None, :, :], mu[:, :, None, :], logvar[:, :, None, :])  # [i, a, b] = log q(z_b | x_a)
    club = (table.diagonal(dim1=1, dim2=2).mean(-1) - table.mean((1, 2))).mean()
    return out, min(1.0, max(0.0, min(v_gain.item(), club.item()) / margin)), v_gain.item(), club.item()


@pytest.mark.parametrize("candidates", ["image", "batch"])
@pytest.mark.parametrize("v_state", ["init", "worse_than_marginal", "fitted"])
def test_loss_scales_the_min_mi_weight_by_the_gate(v_state, candidates):
    """init: V's initialisation (no gain: gate 0); worse_than_marginal: V's log-variance head biased to
    sigma^2 = e^3 (gate 0); fitted: V trained on the step's pairs, so that both of its gains are > 0, with the
    margin set to twice the smaller one (gate 1/2)."""
    model = _model(club_gate=0.02, club_gate_momentum=0.0, club_candidates=candidates)
    images, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    if v_state == "worse_than_marginal":
        with torch.no_grad():
            model.variational.logvar[-1].bias.add_(3.0)
    if v_state == "fitted":
        model.v_steps = 60
        model(images, noise)
        optimizer = torch.optim.Adam(model.variational.parameters(), lr=1e-3)
        for loss in model.estimator_losses():
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        _, _, v_gain, club = _reference_gate(model, images, noise, 1.0)
        assert min(v_gain, club) > 0
        model.club_gate = 2 * min(v_gain, club)
    out, gate, v_gain, club = _reference_gate(model, images, noise, model.club_gate)
    terms = out.terms
    assert terms["v_gain"].item() == pytest.approx(v_gain, abs=1e-4)
    assert terms["min_mi"].item() == pytest.approx(club, abs=1e-4)
    assert terms["club_gate"].item() == pytest.approx(gate, abs=1e-3)
    assert gate == pytest.approx({"init": 0.0, "worse_than_marginal": 0.0, "fitted": 0.5}[v_state], abs=1e-3)
    expected = terms["rec"] + terms["max_mi"] + 10 * gate * terms["min_mi"] + terms["v_nll"]
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_a_shut_gate_leaves_the_encoder_no_min_mi_gradient():
    """Gate 0: the encoder's gradient is that of the run without the min-MI term (w_min 0, V still fitted)."""
    images, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    grads = {}
    for name, kwargs in {"gated": dict(club_gate=0.02, club_gate_momentum=0.0), "no_min": dict(w_min=0.0)}.items():
        model = _model(**kwargs)
        with torch.no_grad():
            model.variational.logvar[-1].bias.add_(3.0)  # V worse than the marginal: v_gain < 0
        out = model(images, noise)
        out.loss.backward()
        grads[name] = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if n.startswith("blocks.")])
        if name == "gated":
            assert out.terms["club_gate"].item() == 0.0
    assert torch.allclose(grads["gated"], grads["no_min"], atol=1e-7)


def test_gate_zero_is_off():
    model = _model(club_gate=0.0)
    out = model(torch.randn(2, 3, 32, 32), torch.rand(2, 64))
    terms = out.terms
    assert "club_gate" not in terms
    expected = terms["rec"] + terms["max_mi"] + 10 * terms["min_mi"] + terms["v_nll"]
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_the_gate_reads_moving_averages_kept_in_the_state(tmp_path):
    """--club_gate_momentum m: club_fit <- m club_fit + (1 - m) (v_gain, estimate) on every training forward, from 0;
    the gate is fit_gate of the averages. Checked against the recurrence run by hand in float64 on the per-step
    readings of a twin model with m = 0 (same weights, same batches); eval forwards leave the averages alone; the
    averages travel in the state dict, and a checkpoint written before they existed still loads."""
    from util.checkpoint import load_matching_state

    m, margin = 0.5, 0.02
    averaged, per_step = _model(club_gate_momentum=m), _model(club_gate_momentum=0.0)
    for model in (averaged, per_step):  # V fitted a little, so that the readings are not all ~0
        with torch.no_grad():
            model.variational.logvar[-1].bias.add_(-0.5)
    expected = torch.zeros(2, dtype=torch.float64)
    generator = torch.Generator().manual_seed(3)
    for _ in range(3):
        images, noise = torch.randn(2, 3, 32, 32, generator=generator), torch.rand(2, 64, generator=generator)
        out = averaged(images, noise)
        reading = per_step(images, noise).terms
        expected = m * expected + (1 - m) * torch.tensor([reading["v_gain"].item(), reading["min_mi"].item()],
                                                         dtype=torch.float64)
        assert averaged.club_fit.tolist() == pytest.approx(expected.tolist(), abs=1e-5)
        gate = min(1.0, max(0.0, min(expected.tolist()) / margin))
        assert out.terms["club_gate"].item() == pytest.approx(gate, abs=1e-3)
    averaged.eval()
    averaged(images, noise)
    assert averaged.club_fit.tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    state = averaged.state_dict()
    assert "club_fit" in state
    fresh = _model(club_gate_momentum=m)
    load_matching_state(fresh, state, "ckpt")
    assert torch.equal(fresh.club_fit, averaged.club_fit)
    older = {key: value for key, value in state.items() if key != "club_fit"}
    load_matching_state(fresh, older, "older ckpt")
    assert torch.equal(fresh.club_fit, averaged.club_fit)  # kept its own value, nothing else missing
    with pytest.raises(ValueError, match="missing"):
        load_matching_state(fresh, {k: v for k, v in older.items() if k != "cls_token"}, "broken ckpt")
