"""The mutual-information terms of MI-MAE as pure tensor functions (computed in float32).

- `multi_positive_info_nce`: InfoNCE lower bound on I(z_k; z_k') between the latents of the masks of one image.
- `club_upper_bound`: CLUB (Cheng et al., 2020) upper bound on I(x; z) with a Gaussian q(z|x), in closed form.
- `gaussian_log_likelihood`: the per-pair log q(z|x) averaged over feature dimensions, V's training signal.
- `standardize`: per-feature zero mean and unit variance over the samples, which makes CLUB scale-free.
- `marginal_gaussian_nll`: the NLL of a per-feature Gaussian that ignores x, the no-information baseline of V.
- `fit_gate`: the share of the min-MI weight that V's held-out fit earns: 0 unless V beats both no-information
  baselines (the marginal and within-group shuffled pairs).

The moments of `standardize` and `marginal_gaussian_nll` are those of every rank's samples (util.dist.global_mean_var;
one process: its own), so that W ranks compute what one process computes on the global batch. The InfoNCE logits
are computed with autocast off: under bf16/fp16 autocast a matmul would run in half precision whatever its inputs.
"""
import torch
import torch.nn.functional as F

from util.dist import global_mean_var


def multi_positive_info_nce(
    anchors: torch.Tensor, candidates: torch.Tensor, anchor_groups: torch.Tensor, candidate_groups: torch.Tensor,
    anchor_index: torch.Tensor, temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over anchors of -1/|P(a)| sum_{p in P(a)} log( exp(s_ap) / sum_{c != a} exp(s_ac) ), s = u·v / tau.

    anchors (R, d) and candidates (C, d) are L2-normalised; rows of the same group (image) are positives;
    `anchor_index` (R,) gives each anchor's own row among the candidates, which is left out.
    Returns the loss and the top-1 accuracy (%) of retrieving a positive among the candidates.
    """
    with torch.autocast(anchors.device.type, enabled=False):
        logits = anchors.float() @ candidates.float().T / temperature  # (R, C)
    own = F.one_hot(anchor_index, candidates.shape[0]).bool()
    logits = logits.masked_fill(own, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (anchor_groups[:, None] == candidate_groups[None, :]) & ~own
    per_anchor = -(log_prob.masked_fill(~positive, 0.0).sum(1)) / positive.sum(1).clamp(min=1)
    accuracy = positive.gather(1, logits.argmax(1, keepdim=True)).float().mean() * 100
    return per_anchor.mean(), accuracy.detach()


def gaussian_log_likelihood(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag exp(logvar)) without the 2*pi constant, averaged over the last (feature) dimension:
    -1/D sum_d [ (z_d - mu_d)^2 / (2 sigma_d^2) + log(sigma_d^2) / 2 ]. Shapes (..., D) -> (...)."""
    z, mu, logvar = z.float(), mu.float(), logvar.float()
    return -((z - mu).pow(2) / (2 * logvar.exp()) + 0.5 * logvar).mean(-1)


def club_upper_bound(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, negatives: str = "group") -> torch.Tensor:
    """CLUB estimate of I(x; z): the mean over pairs a of log q(z_a|x_a) - mean_{b in N(a)} log q(z_b|x_a), with q's
    log-likelihood averaged over dims.

    z, mu, logvar: (B, M, D), M pairs per group, mu/logvar = V(x) (pass them detached to keep V fixed). The negatives
    N(a) of a pair are its group's M latents (`negatives="group"`) or every latent of every group of every rank
    (`"all"`: CLUB's own estimator, whose negatives sample the marginal p(z); the moments come from
    util.dist.global_mean_var, so W ranks compute what one process computes). The log-variance terms cancel and the
    inner mean is closed-form per dimension, mean_b (z_b - mu_a)^2 = Var(z) + (mean(z) - mu_a)^2 over N(a), so no
    (M x M) tensor is built.
    """
    z, mu, logvar = z.float(), mu.float(), logvar.float()
    if negatives == "group":
        z_mean, z_var = z.mean(dim=1, keepdim=True), z.var(dim=1, unbiased=False, keepdim=True)
    elif negatives == "all":
        z_mean, z_var = global_mean_var(z.reshape(-1, z.shape[-1]))
    else:
        raise ValueError(f"negatives must be 'group' or 'all', got {negatives!r}")
    inv_two_var = 0.5 * torch.exp(-logvar)
    positive = (z - mu).pow(2)
    negative = z_var + (z_mean - mu).pow(2)
    return ((negative - positive) * inv_two_var).mean(-1).mean()


def club_upper_bound_sampled(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, negatives: str = "group",
                             generator: torch.Generator | None = None) -> torch.Tensor:
    """CLUB's sampled variant: each pair a is contrasted with one random partner b, drawn from its group
    (`negatives="group"`) or from every pair of this rank (`"all"`). The permutation is drawn on z's device (from
    `generator`, which must live there, or that device's default one): no host round trip."""
    if negatives == "all":
        z, mu, logvar = (t.reshape(1, -1, t.shape[-1]) for t in (z, mu, logvar))
    perm = torch.argsort(torch.rand(z.shape[0], z.shape[1], generator=generator, device=z.device), dim=1)
    shuffled = torch.gather(z, 1, perm.unsqueeze(-1).expand_as(z))
    return (gaussian_log_likelihood(z, mu, logvar) - gaussian_log_likelihood(shuffled, mu, logvar)).mean()


def standardize(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(..., D) -> per-feature zero mean, unit (biased) variance over every leading position of every rank, in
    float32.

    The statistics keep their gradient (as in BatchNorm), so an encoder cannot lower a bound computed on the
    result by shrinking its latents: CLUB with a Gaussian q is otherwise not scale-invariant once log sigma^2
    is bounded below, and scaling z down is then the cheapest way to lower it."""
    mean, var = global_mean_var(z.float().reshape(-1, z.shape[-1]))
    return (z.float() - mean) * torch.rsqrt(var + eps)


def marginal_gaussian_nll(z: torch.Tensor) -> torch.Tensor:
    """NLL (in `gaussian_log_likelihood`'s units: no 2*pi, mean over features) of a per-feature Gaussian fitted
    to the samples of z (..., D) by maximum likelihood: mean_d [1 + log var_d] / 2. A V that uses x must score
    below it; the difference is V's information gain (`v_gain`)."""
    _, var = global_mean_var(z.float().reshape(-1, z.shape[-1]))
    return 0.5 * (1.0 + var.clamp(min=1e-12).log()).mean()


def fit_gate(v_gain: torch.Tensor, club_estimate: torch.Tensor, margin: float) -> torch.Tensor:
    """clamp(min(v_gain, club_estimate) / margin, 0, 1), detached, float32 (margin > 0), both measured with a V that
    has not trained on the pairs yet. CLUB bounds I(x; z) only for a V that fits the true pairs better than the two
    no-information baselines: the marginal (`v_gain` > 0) and the pairs shuffled within their group (the CLUB
    estimate > 0, which a true MI cannot be below). The gate is 0 while either fails and reaches 1 once both beat
    them by `margin`."""
    return (torch.minimum(v_gain.detach().float(), club_estimate.detach().float()) / margin).clamp(0.0, 1.0)
