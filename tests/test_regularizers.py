"""U-MAE's uniformity and M-MAE's TCR against computations from their definitions; the gathered gradient."""
import math

import pytest
import torch
from conftest import run_script
from reg_grad_worker import CASES, fixed_inputs, weight_gradient

from util.regularizers import tcr_loss, uniformity_loss

SHAPES = [(6, 10), (8, 8), (12, 5)]  # (m, d): m < d, m = d, m > d


def random_features(m: int, d: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows of random direction and random length (the terms must only see directions)."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(m, d, generator=generator, dtype=torch.float64)
    return (z * (0.5 + 3 * torch.rand(m, 1, generator=generator, dtype=torch.float64))).to(dtype)


def unit_rows(z: torch.Tensor, center: bool = False) -> torch.Tensor:
    """Float64 unit rows, times J_m = I - 11^T/m written out when `center`."""
    unit = z.double() / z.double().norm(dim=1, keepdim=True)
    m = unit.shape[0]
    return (torch.eye(m, dtype=torch.float64) - 1.0 / m) @ unit if center else unit


def tcr_by_eigenvalues(z: torch.Tensor, mu: float, center: bool = False) -> float:
    """-sum_i log(1 + mu/d lambda_i) over the eigenvalues of the d x d matrix Z^T J Z (the definition), float64."""
    unit = unit_rows(z, center)
    eigenvalues = torch.linalg.eigvalsh(unit.T @ unit)
    return -torch.log1p(mu / unit.shape[1] * eigenvalues).sum().item()


def uniformity_by_loops(z: torch.Tensor) -> float:
    unit = unit_rows(z).tolist()
    m = len(unit)
    return sum(sum(a * b for a, b in zip(unit[i], unit[j])) ** 2 for i in range(m) for j in range(m)) / m**2


@pytest.mark.parametrize("m,d", SHAPES)
@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "bf16 autocast", "bf16 features"])
def test_tcr_equals_eigenvalue_reference(m, d, center, precision):
    mu = 1.7
    z = random_features(m, d, dtype=torch.bfloat16 if precision == "bf16 features" else torch.float32)
    if precision == "bf16 autocast":  # the Gram matmul would run in bf16 (about 3 significant digits) if autocast reached it
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = tcr_loss(z, mu, center)
    else:
        value = tcr_loss(z, mu, center)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(tcr_by_eigenvalues(z, mu, center), rel=2e-6, abs=1e-6)


@pytest.mark.parametrize("m,d", SHAPES)
def test_uniformity_equals_double_loop(m, d):
    z = random_features(m, d, seed=1)
    assert uniformity_loss(z).item() == pytest.approx(uniformity_by_loops(z), rel=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert uniformity_loss(z).item() == pytest.approx(uniformity_by_loops(z), rel=1e-6)


def test_closed_forms_and_the_ranges_of_the_spec():
    """Orthonormal rows (m <= d), a tight frame (m = 2d) and full collapse hit the ends of the spec's ranges."""
    mu, d = 3.0, 8
    for m in (3, d):
        orthonormal = torch.linalg.qr(torch.randn(d, m, generator=torch.Generator().manual_seed(m)))[0].T  # (m, d)
        scaled = orthonormal * torch.arange(1, m + 1).unsqueeze(1)  # lengths do not matter
        assert tcr_loss(scaled, mu).item() == pytest.approx(-m * math.log(1 + mu / d), rel=1e-6)
        assert uniformity_loss(scaled).item() == pytest.approx(1 / m, rel=1e-6)
    m = 2 * d
    tight_frame = torch.eye(d).repeat(2, 1)  # Z^T Z = (m/d) I: the largest coding rate for m >= d
    assert tcr_loss(tight_frame, mu).item() == pytest.approx(-d * math.log(1 + mu * m / d**2), rel=1e-6)
    assert uniformity_loss(tight_frame).item() == pytest.approx(1 / d, rel=1e-6)
    collapsed = torch.randn(1, d).repeat(m, 1)
    assert tcr_loss(collapsed, mu).item() == pytest.approx(-math.log(1 + mu * m / d), rel=1e-6)
    assert uniformity_loss(collapsed).item() == pytest.approx(1.0, rel=1e-6)
    z = random_features(m, d)
    assert -d * math.log(1 + mu * m / d**2) <= tcr_loss(z, mu).item() <= -math.log(1 + mu * m / d)
    assert 1 / d <= uniformity_loss(z).item() <= 1


@pytest.mark.parametrize("m,d", [(8, 16), (16, 8)])
def test_second_order_expansion_is_the_uniformity_term(m, d):
    """R_TCR = -mu m/d + mu^2 m^2/(2 d^2) R_U + O(mu^3): halving mu divides the remainder by 8; the gradients
    (the constant drops out) agree up to O(mu), so M-MAE with lambda_M is U-MAE with lambda_M mu^2 m^2/(2 d^2)."""
    z = random_features(m, d, seed=2, dtype=torch.float64).requires_grad_(True)
    uniformity = uniformity_loss(z)
    (uniformity_grad,) = torch.autograd.grad(uniformity, z)
    remainders, gradient_errors = [], []
    for mu in (0.2, 0.1, 0.05):
        quadratic = mu**2 * m**2 / (2 * d**2)
        tcr = tcr_loss(z, mu)
        (tcr_grad,) = torch.autograd.grad(tcr, z)
        remainders.append(abs(tcr.item() - (-mu * m / d + quadratic * uniformity.item())))
        gradient_errors.append(((tcr_grad - quadratic * uniformity_grad).norm() / tcr_grad.norm()).item())
    for coarse, fine in zip(remainders, remainders[1:]):
        assert 7.0 < coarse / fine < 9.0
    for coarse, fine in zip(gradient_errors, gradient_errors[1:]):
        assert 1.8 < coarse / fine < 2.2
    assert gradient_errors[-1] < 0.05


@pytest.mark.parametrize("m,d", SHAPES)
@pytest.mark.parametrize("center", [False, True])
def test_tcr_gradient_through_cholesky_equals_logdet_gradient(m, d, center):
    mu = 2.0
    z = random_features(m, d, seed=3).requires_grad_(True)
    tcr_loss(z, mu, center).backward()
    reference_z = z.detach().double().requires_grad_(True)
    unit = unit_rows(reference_z, center)
    (-torch.logdet(torch.eye(d, dtype=torch.float64) + mu / d * unit.T @ unit)).backward()
    assert torch.isfinite(z.grad).all()
    torch.testing.assert_close(z.grad.double(), reference_z.grad, rtol=1e-4, atol=1e-6)


def test_non_finite_features_give_nan_not_an_exception():
    """The engine's finite check names the bad term; a failed Cholesky must not raise first."""
    z = random_features(6, 4)
    z[2, 1] = float("nan")
    assert torch.isnan(tcr_loss(z))
    assert torch.isnan(uniformity_loss(z))


@pytest.mark.slow
def test_two_gloo_ranks_give_the_single_process_gradient(tmp_path):
    """gather_with_grad: 2 ranks (gradients averaged like DDP) == one process on the concatenated batch. The
    official gather (backward keeps only the local slice) gives 1/W of it: its lambda acts as lambda / W."""
    run_script(["tests/reg_grad_worker.py", str(tmp_path / "grads.pt")], torchrun=2)
    distributed = torch.load(tmp_path / "grads.pt", weights_only=True)
    world_size = 2
    for name, (dim, regularizer) in CASES.items():
        single = weight_gradient(fixed_inputs(), dim, regularizer, gather=lambda z: z)
        assert single.norm() > 0
        torch.testing.assert_close(distributed[name], single, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(distributed[f"official_{name}"], single / world_size, rtol=1e-5, atol=1e-7, msg=name)
