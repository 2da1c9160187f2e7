"""InfoNCE (MI-MAE) and NT-Xent (CMAE) compute their logits in float32 whatever autocast says: under bf16 autocast
their loss and input gradient equal a float64 computation written here term by term, to float32 rounding (a bf16
matmul is off by about 6e-3 in the gradient, 17% on a saturated task)."""
import math

import pytest
import torch
import torch.nn.functional as F

from util.cmae_losses import nt_xent_loss
from util.mi_losses import multi_positive_info_nce


def unit_rows(rows: int, dim: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, dim, generator=generator) * scale, dim=1)


def info_nce_float64(z: torch.Tensor, groups: list[int], temperature: float) -> torch.Tensor:
    """-1/R sum_a 1/|P(a)| sum_{p in P(a)} log( exp(s_ap) / sum_{c != a} exp(s_ac) ), one anchor at a time."""
    z = z.double()
    total = 0.0
    for a in range(len(groups)):
        others = [c for c in range(len(groups)) if c != a]
        denominator = torch.logsumexp(torch.stack([z[a] @ z[c] / temperature for c in others]), 0)
        positives = [p for p in others if groups[p] == groups[a]]
        total = total - sum(z[a] @ z[p] / temperature - denominator for p in positives) / len(positives)
    return total / len(groups)


def nt_xent_float64(u1: torch.Tensor, u2: torch.Tensor, temperature: float) -> torch.Tensor:
    u = torch.cat([u1, u2]).double()
    rows = u1.shape[0]
    total = 0.0
    for i in range(2 * rows):
        partner = (i + rows) % (2 * rows)
        logits = torch.stack([u[i] @ u[k] / temperature for k in range(2 * rows) if k != i])
        total = total - (u[i] @ u[partner] / temperature - torch.logsumexp(logits, 0))
    return total / (2 * rows)


def loss_and_gradient(function, *inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    loss = function(*leaves)
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("saturated", [False, True])
def test_info_nce_under_bf16_autocast_equals_float64(saturated):
    images, masks, temperature = 4, 3, 0.07
    groups = [i for i in range(images) for _ in range(masks)]
    z = unit_rows(images * masks, 16, seed=0)
    if saturated:  # each image's masks nearly aligned: the task is solved, the gradient lives in small differences
        z = F.normalize(unit_rows(images, 16, seed=1).repeat_interleave(masks, 0) + 0.05 * z, dim=1)
    group_ids, own = torch.tensor(groups), torch.arange(len(groups))

    def ours(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return multi_positive_info_nce(x, x, group_ids, group_ids, own, temperature)[0]

    loss, (grad,) = loss_and_gradient(ours, z)
    reference, (reference_grad,) = loss_and_gradient(lambda x: info_nce_float64(x, groups, temperature), z.double())
    assert loss.dtype == torch.float32
    assert math.isclose(loss.item(), reference.item(), rel_tol=1e-5)
    torch.testing.assert_close(grad.double(), reference_grad, rtol=1e-4, atol=1e-5)


def test_nt_xent_under_bf16_autocast_equals_float64():
    u1, u2, temperature = unit_rows(6, 16, seed=2), unit_rows(6, 16, seed=3), 0.2

    def ours(a, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return nt_xent_loss(a, b, temperature)[0]

    loss, grads = loss_and_gradient(ours, u1, u2)
    reference, reference_grads = loss_and_gradient(lambda a, b: nt_xent_float64(a, b, temperature), u1.double(), u2.double())
    assert loss.dtype == torch.float32
    assert math.isclose(loss.item(), reference.item(), rel_tol=1e-5)
    for grad, reference_grad in zip(grads, reference_grads):
        torch.testing.assert_close(grad.double(), reference_grad, rtol=1e-4, atol=1e-5)
