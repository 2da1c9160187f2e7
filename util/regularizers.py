"""The feature regularisers of U-MAE and M-MAE as pure tensor functions of one (gathered) batch of features.

Shapes: z (m, d), m rows (the batch, gathered over ranks by the caller), d feature dimensions. Rows are
L2-normalised here (eps 1e-12, as F.normalize), so both terms are functions of cosine similarities only.
Both are computed with autocast off, in float32 (float64 inputs stay float64): under fp16/bf16 autocast
the Gram matmul would otherwise run in half precision.

- `uniformity_loss` (U-MAE): R_U = 1/m^2 sum_{i,j} (z_i . z_j)^2, in [max(1/m, 1/d), 1]; 1 = full collapse.
- `tcr_loss` (M-MAE): R_TCR = -log det(I_d + mu/d Z^T Z), the negative total coding rate (official code:
  no 1/2, no epsilon, divisor d). Without centering, to second order in mu, R_TCR = -mu m/d + mu^2 m^2/(2 d^2) R_U.
"""
import torch
import torch.nn.functional as F


def _unit_rows(z: torch.Tensor) -> torch.Tensor:
    """(m, d) -> (m, d) L2-normalised rows in float32 at least (float64 stays float64)."""
    return F.normalize(z.to(torch.promote_types(z.dtype, torch.float32)), dim=1, eps=1e-12)


def _smaller_gram(z: torch.Tensor) -> torch.Tensor:
    """Z^T Z (d, d) or Z Z^T (m, m), whichever is smaller: both have the same non-zero eigenvalues."""
    return z.T @ z if z.shape[1] <= z.shape[0] else z @ z.T


def uniformity_loss(z: torch.Tensor) -> torch.Tensor:
    """U-MAE: mean over all m^2 ordered pairs, the diagonal (i = j, value 1) included, of the squared cosine
    similarity. z (m, d) -> scalar.

    Computed as ||G||_F^2 / m^2 on the smaller Gram matrix G (sum_ij (z_i . z_j)^2 = ||Z Z^T||_F^2 = ||Z^T Z||_F^2).
    """
    with torch.autocast(z.device.type, enabled=False):
        unit = _unit_rows(z)
        return _smaller_gram(unit).square().sum() / unit.shape[0] ** 2


def tcr_loss(z: torch.Tensor, mu: float = 1.0, center: bool = False) -> torch.Tensor:
    """M-MAE: -log det(I_d + (mu/d) Zc^T Zc) with Z the L2-normalised rows of z (m, d) -> scalar.

    Zc = J_m Z (rows minus their mean, J_m = I - 11^T/m) when `center`, else Z; Z^T J Z = (JZ)^T (JZ) as J is a
    symmetric projection. By Sylvester's identity det(I_d + c Z^T Z) = det(I_m + c Z Z^T), so the Cholesky
    factor is taken of the smaller side; the matrix is SPD with eigenvalues in [1, 1 + mu m/d], hence
    log det = 2 sum log diag(L) is well conditioned for m < d, m = d and m > d.
    """
    with torch.autocast(z.device.type, enabled=False):
        unit = _unit_rows(z)
        if center:
            unit = unit - unit.mean(dim=0, keepdim=True)
        gram = _smaller_gram(unit)
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        # cholesky_ex: no host sync for the error check; a failed factorisation (non-finite features)
        # becomes NaN, which the engine's finite check then names, instead of an exception inside autograd.
        factor, info = torch.linalg.cholesky_ex(eye + (mu / unit.shape[1]) * gram)
        logdet = 2 * factor.diagonal().log().sum()
        return torch.where(info == 0, -logdet, torch.full_like(logdet, float("nan")))
