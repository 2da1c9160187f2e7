"""MI-MAE (Huang et al., ICLR 2025): MAE with N orthogonal masks per image, an InfoNCE loss that maximises the
mutual information between the latents of one image's masks, and a CLUB upper bound (with a variational
Gaussian network V) that minimises the mutual information between each patch and its latent token.

The paper's code is not public; what is a reading rather than a fact is a flag (see ../shared/methods/mi_mae.md
and the README's MI-MAE section). Encoder and decoder keys are MAE's, so fine-tuning loads MI-MAE checkpoints
exactly like MAE ones (the projector and V are dropped).
"""
import argparse
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from models_mae import MAE_SIZES, MaskedAutoencoderViT, PretrainOutput, build_mae, mae_model_kwargs
from util.config import bool_flag
from util.dist import gather_with_grad, get_rank
from util.mi_losses import club_upper_bound, club_upper_bound_sampled, gaussian_log_likelihood, multi_positive_info_nce
from util.mim import (
    check_num_masks,
    gather_tokens,
    masked_mse_loss,
    normalize_patches,
    orthogonal_mask_noise,
    patchify,
    random_masking,
)
from util.registry import Method, register_method, register_model


class GaussianVariationalNet(nn.Module):
    """V: q_theta(z | x) = N(mu(x), diag exp(logvar(x))), two MLP heads; tanh bounds the log-variance to (-1, 1)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int):
        super().__init__()
        self.mu = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))
        self.logvar = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim), nn.Tanh())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mu(x), self.logvar(x)


class MIMaskedAutoencoderViT(MaskedAutoencoderViT):
    def __init__(self, num_masks: int = 4, mask_mode: str = "orthogonal", mi_temperature: float = 0.2,
                 mi_feat: str = "mean", mi_proj: str = "mlp", nce_gather: bool = False, v_hidden: int = 512,
                 club_sampled: bool = False, w_rec: float = 1.0, w_max: float = 1.0, w_min: float = 10.0,
                 w_v: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if mask_mode not in ("orthogonal", "independent"):
            raise ValueError(f"--mask_mode must be orthogonal or independent, got {mask_mode!r}")
        if mask_mode == "orthogonal":
            check_num_masks(self.num_patches, num_masks, self.mask_ratio)
        if num_masks == 1 and w_max > 0:
            raise ValueError("--w_max > 0 needs --num_masks >= 2: with one mask an image has no positive pair")
        self.num_masks, self.mask_mode, self.mi_temperature = num_masks, mask_mode, mi_temperature
        self.mi_feat, self.nce_gather, self.club_sampled = mi_feat, nce_gather, club_sampled
        self.weights = {"rec": w_rec, "max_mi": w_max, "min_mi": w_min, "v_nll": w_v}
        dim = self.cls_token.shape[-1]
        if mi_proj == "mlp":
            self.mi_projector = nn.Sequential(nn.Linear(dim, 2048), nn.BatchNorm1d(2048), nn.ReLU(), nn.Linear(2048, 256))
        elif mi_proj == "none":
            self.mi_projector = nn.Identity()
        else:
            raise ValueError(f"--mi_proj must be mlp or none, got {mi_proj!r}")
        self.variational = GaussianVariationalNet(self.patch_size**2 * self.in_chans, dim, v_hidden)
        for module in (self.mi_projector, self.variational):
            module.apply(self._init_module)

    @property
    def sequences_per_image(self) -> int:
        return self.num_masks

    @property
    def noise_per_sample(self) -> int:
        # Orthogonal masks all come from one permutation; independent masks need their own noise each.
        return self.num_patches * (self.num_masks if self.mask_mode == "independent" else 1)

    def mask_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """(B, noise_per_sample) -> (B * N, L): row i * N + k is mask k of image i."""
        if self.mask_mode == "orthogonal":
            per_mask = orthogonal_mask_noise(noise, self.num_masks, self.mask_ratio)
        else:
            per_mask = noise.view(noise.shape[0], self.num_masks, self.num_patches)
        return per_mask.reshape(-1, self.num_patches)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """MAE's groups for everything but V; V trains in its own group without weight decay."""
        v_params = set(self.variational.parameters())
        groups = super().param_groups(weight_decay)
        for group in groups:
            group["params"] = [p for p in group["params"] if p not in v_params]
        return groups + [{"params": list(self.variational.parameters()), "weight_decay": 0.0, "name": "variational"}]

    def max_mi_loss(self, latent: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """InfoNCE between the pooled, projected latents of the masks; positives = the other masks of the image."""
        pooled = latent[:, 1:].mean(dim=1) if self.mi_feat == "mean" else latent[:, 0]
        anchors = F.normalize(self.mi_projector(pooled).float(), dim=-1)
        groups = torch.arange(batch, device=latent.device).repeat_interleave(self.num_masks)
        own = torch.arange(anchors.shape[0], device=latent.device)
        candidates, candidate_groups = anchors, groups
        if self.nce_gather:  # every rank's rows as negatives; the gather's backward sums gradients over ranks
            candidates = gather_with_grad(anchors)
            offset = get_rank() * anchors.shape[0]
            candidate_groups = torch.arange(candidates.shape[0], device=latent.device) // self.num_masks
            groups, own = groups + offset // self.num_masks, own + offset
        return multi_positive_info_nce(anchors, candidates, groups, candidate_groups, own, self.mi_temperature)

    def forward(self, imgs: torch.Tensor, noise: Optional[torch.Tensor] = None) -> PretrainOutput:
        batch, num_masks = imgs.shape[0], self.num_masks
        masking = random_masking(self.mask_noise(self.draw_noise(imgs) if noise is None else noise), self.mask_ratio)
        # One patch embedding per image, shared by its N masks; the B*N sequences run as one batch.
        tokens = self.embed_patches(imgs).repeat_interleave(num_masks, dim=0)
        latent = self.encode(tokens, masking.ids_keep)  # (B*N, 1 + n_v, D)
        pred = self.decode(latent, masking.ids_restore)
        pixels = patchify(imgs, self.patch_size)
        target = normalize_patches(pixels) if self.norm_pix_loss else pixels
        rec = masked_mse_loss(pred, target.repeat_interleave(num_masks, dim=0), masking.mask)

        max_mi, nce_acc = self.max_mi_loss(latent, batch)

        # CLUB on (x_a, z_a): each visible patch's normalised pixels and its latent token, grouped per image.
        x = gather_tokens(normalize_patches(pixels).repeat_interleave(num_masks, dim=0), masking.ids_keep)
        x = x.reshape(batch, -1, x.shape[-1])  # (B, M, P), M = N * n_v
        z = latent[:, 1:].reshape(batch, -1, latent.shape[-1])  # (B, M, D)
        mu, logvar = self.variational(x.to(z.dtype))
        # V is fixed inside the bound (its outputs detached); the encoder is fixed inside V's likelihood (z detached).
        club = (club_upper_bound_sampled if self.club_sampled else club_upper_bound)(z, mu.detach(), logvar.detach())
        v_nll = -gaussian_log_likelihood(z.detach(), mu, logvar).mean()

        losses = {"rec": rec, "max_mi": max_mi, "min_mi": club, "v_nll": v_nll}
        loss = sum(self.weights[name] * value for name, value in losses.items() if self.weights[name] != 0)
        terms = {name: value.detach() for name, value in losses.items()}
        terms["nce_acc"] = nce_acc
        terms["latent_std"] = z.detach().float().std(dim=1).mean()  # watch for over-compression
        features = latent[:, 0].reshape(batch, num_masks, -1).mean(dim=1)  # cls, averaged over the masks
        return PretrainOutput(loss, terms, features)

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, noise: Optional[torch.Tensor] = None):
        """The first mask's reconstruction (MAE's), for the visualisation grid."""
        noise = self.draw_noise(imgs) if noise is None else noise
        return super().reconstruct(imgs, noise[:, : self.num_patches])


@register_model
def mi_mae_vit_base_patch16(**kwargs) -> MIMaskedAutoencoderViT:
    return build_mae("vit_base_patch16", MIMaskedAutoencoderViT, **kwargs)


@register_model
def mi_mae_vit_large_patch16(**kwargs) -> MIMaskedAutoencoderViT:
    return build_mae("vit_large_patch16", MIMaskedAutoencoderViT, **kwargs)


@register_model
def mi_mae_vit_huge_patch14(**kwargs) -> MIMaskedAutoencoderViT:
    return build_mae("vit_huge_patch14", MIMaskedAutoencoderViT, **kwargs)


@register_model
def mi_mae_vit_tiny_patch4(**kwargs) -> MIMaskedAutoencoderViT:
    return build_mae("vit_tiny_patch4", MIMaskedAutoencoderViT, **kwargs)


@register_model
def mi_mae_vit_small_patch4(**kwargs) -> MIMaskedAutoencoderViT:
    return build_mae("vit_small_patch4", MIMaskedAutoencoderViT, **kwargs)


def add_mi_mae_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--num_masks", default=4, type=int,
                       help="masks per image (N); orthogonal masks need N <= 1/(1 - mask_ratio): 4 masks at 0.75 partition the image")
    group.add_argument("--mask_mode", default="orthogonal", choices=["orthogonal", "independent"],
                       help="orthogonal: one permutation split into N disjoint visible sets (reading); independent: N MAE masks (ablation)")
    group.add_argument("--mi_temperature", default=0.2, type=float, help="InfoNCE temperature tau of the max-MI loss")
    group.add_argument("--mi_feat", default="mean", choices=["mean", "cls"],
                       help="latent of a mask for the max-MI loss: mean of its visible tokens (reading) or the cls token")
    group.add_argument("--mi_proj", default="mlp", choices=["mlp", "none"],
                       help="projection before InfoNCE: Linear(D,2048)-BN-ReLU-Linear(2048,256) (reading) or none")
    group.add_argument("--nce_gather", default=False, type=bool_flag,
                       help="add every rank's rows as InfoNCE negatives (gather whose backward sums gradients over ranks)")
    group.add_argument("--v_hidden", default=512, type=int, help="hidden width of V's mean and log-variance MLPs")
    group.add_argument("--club_sampled", default=False, type=bool_flag,
                       help="CLUB with one random partner per pair instead of the closed-form mean over all pairs of the image")
    group.add_argument("--w_rec", default=1.0, type=float, help="weight of the reconstruction loss (lambda1 in reading A)")
    group.add_argument("--w_max", default=1.0, type=float, help="weight of the max-MI InfoNCE loss (lambda2 in reading A, lambda1 in B)")
    group.add_argument("--w_min", default=10.0, type=float,
                       help="weight of the CLUB min-MI loss (lambda3 = 10 in reading A, the default; lambda2 = 1 in reading B: use --w_min 1 --w_v 10)")
    group.add_argument("--w_v", default=1.0, type=float, help="weight of V's negative log-likelihood (1 in reading A; lambda3 = 10 in reading B)")


def mi_mae_model_kwargs(args: argparse.Namespace) -> dict:
    names = ("num_masks", "mask_mode", "mi_temperature", "mi_feat", "mi_proj", "nce_gather", "v_hidden",
             "club_sampled", "w_rec", "w_max", "w_min", "w_v")
    return {**mae_model_kwargs(args), **{name: getattr(args, name) for name in names}}


def mi_mae_run_label(args: dict) -> str:
    """MI-MAE with every MI weight at 0 is MAE (one mask) or the compute-matched MAE x N control."""
    if args.get("w_max", 1.0) == 0 and args.get("w_min", 10.0) == 0:
        num_masks = args.get("num_masks", 4)
        return "MAE" if num_masks == 1 else f"MAE x {num_masks} (no MI)"
    return "MI-MAE"


def validate_mi_mae_args(args: argparse.Namespace) -> None:
    patch = MAE_SIZES[args.model.removeprefix("mi_mae_")]["patch_size"]
    if args.input_size % patch:
        raise ValueError(f"--input_size {args.input_size} is not divisible by the patch size {patch}")
    if args.mask_mode == "orthogonal":
        check_num_masks((args.input_size // patch) ** 2, args.num_masks, args.mask_ratio)
    if args.num_masks == 1 and args.w_max > 0:
        raise ValueError("--w_max > 0 needs --num_masks >= 2: with one mask an image has no positive pair")


register_method(Method(name="MI-MAE", prefix="mi_mae_", model_kwargs=mi_mae_model_kwargs, add_args=add_mi_mae_args,
                       validate=validate_mi_mae_args, run_label=mi_mae_run_label))
