"""MI-MAE (Huang et al., ICLR 2025): MAE with N orthogonal masks per image, an InfoNCE loss that maximises the
mutual information between the latents of one image's masks, and a CLUB upper bound (with a variational
Gaussian network V) that minimises the mutual information between each patch and its latent token.

The paper's code is not public; what is a reading rather than a fact is a flag (see
docs/methods/mi_mae.md). Encoder and decoder keys are MAE's, so fine-tuning loads MI-MAE checkpoints
exactly like MAE ones (the projector and V are dropped).
"""
import argparse
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from engine_pretrain import PretrainOutput
from models_mae import MAE_SIZES, MaskedAutoencoderViT, build_mae, mae_model_kwargs
from util.dist import GlobalBatchNorm1d, all_reduce_mean, gather_with_grad, get_rank
from util.mi_losses import (
    club_upper_bound,
    club_upper_bound_sampled,
    fit_gate,
    gaussian_log_likelihood,
    marginal_gaussian_nll,
    multi_positive_info_nce,
    standardize,
)
from util.mim import (
    check_num_masks,
    gather_tokens,
    masked_mse_loss,
    normalize_patches,
    orthogonal_mask_noise,
    patchify,
    random_masking,
)
from util.spec import Knob, Method, model_factory


# Each hyper-parameter once: its flag, check, default and model argument all come from here (util/spec.py).
MI_MAE_KNOBS = (
    Knob('num_masks', 4,
         'masks per image (N); orthogonal masks need N <= 1/(1 - mask_ratio): 4 masks at 0.75 partition '
         'the image',
         interval='[1, inf)'),
    Knob('mask_mode', 'orthogonal',
         'orthogonal: one permutation split into N disjoint visible sets (reading); independent: N MAE '
         'masks (ablation)',
         choices=('orthogonal', 'independent')),
    Knob('mi_temperature', 0.07,
         "InfoNCE temperature tau of the max-MI loss; 0.07 is the submission's (quoted by an automated "
         "review of the ICLR submission); 0.2 was this project's earlier reading (a preset keeps it)",
         interval='(0, inf)'),
    Knob('mi_feat', 'mean',
         'latent of a mask for the max-MI loss: mean of its visible tokens (reading) or the cls token',
         choices=('mean', 'cls')),
    Knob('mi_proj', 'mlp',
         'projection before InfoNCE: Linear(D,2048)-BN-ReLU-Linear(2048,256) (reading; the BatchNorm takes the '
         "global batch's statistics on any number of ranks) or none",
         choices=('mlp', 'none')),
    Knob('nce_gather', True,
         "InfoNCE negatives from every rank (a gather whose backward sums gradients over ranks), so that W ranks "
         "train what one process trains on the global batch; false: this rank's rows only, which makes the "
         "task, and the results, depend on the GPU count"),
    Knob('v_hidden', 512,
         "hidden width of V's mean and log-variance MLPs",
         interval='[1, inf)'),
    Knob('v_logvar_bound', 5.0,
         "V's log sigma^2 lies in (-b, b) (b tanh(raw / b)); CLUB's reference head is b = 1, which caps "
         "V's NLL at -0.5 + residual and leaves the bound loose once V predicts z better than sigma^2 = "
         'e^-1',
         interval='(0, inf)'),
    Knob('v_lr_scale', 1.0,
         "V's lr = this x the main lr (its own AdamW group, see --v_lr_schedule): CLUB is a bound only for"
         ' a V near its optimum; at 3x with 4 extra steps V overfits each batch late in the run '
         '(train_v_gain falls, docs/RESULTS.md)',
         interval='[0, inf)'),
    Knob('v_lr_schedule', 'constant',
         "V's lr schedule: constant (the main schedule's peak lr throughout: the estimator must keep "
         "fitting while the encoder anneals, as CLUB's reference trains its estimator at a fixed lr; with "
         "it train_v_gain rises again in the demo's last epoch in 2 of 3 seeds), cosine (the main cosine without"
         ' warm-up) or warmup_cosine (the main schedule)',
         choices=('constant', 'cosine', 'warmup_cosine')),
    Knob('v_steps', 8,
         "extra AdamW updates of V after each optimizer step, on that step's detached (x, z) pairs: at the"
         " main lr alone V lags the encoder (train_v_gain ~ 0.02); 8 end the demo at 0.031 +- 0.006 (3 "
         'seeds; 0.024 before) for ~15%% more step time; 16 at --v_lr_scale 10 overfit each batch (train_v_gain < 0 on '
         'the next). V is a 2-layer MLP on the B x M pairs, small next to the ViT',
         interval='[0, inf)'),
    Knob('club_level', 'patch',
         "patch: pairs (visible patch's norm-pix values, its latent token), this project's reading; mask: pairs "
         "(mask j's visible input as the mean of its patch embeddings, mask j's pooled latent), the submission's "
         "form (with --club_candidates image). --club_candidates picks the negatives",
         choices=('patch', 'mask')),
    Knob('club_candidates', 'batch',
         "the negatives of a CLUB pair: batch, every pair of the global batch (CLUB's own estimator: they sample "
         "the marginal of z, the distribution V's fit is measured against, so the bound holds wherever "
         "train_v_gain > 0); image, the other pairs of its image (the N masks at --club_level mask: the "
         "submission's form; the image's visible patches at patch level: this project's first reading, which a V "
         "fitted on the whole batch does not bound: on the cifar10 study plan its estimate went < 0 and the gate "
         "shut the term, 0.18 to 0.003, while with batch the estimate stayed > 0 and the gate open, docs/RESULTS.md)",
         choices=('image', 'batch')),
    Knob('club_dir', 'z_given_x',
         "V models q(z|x) (V's outputs detached in the bound) or q(x|z) (V's parameters held fixed in the "
         "bound, z's gradient flows through V's input)",
         choices=('z_given_x', 'x_given_z')),
    Knob('club_standardize', True,
         "standardise z per feature over the batch before CLUB and V's NLL: the bound is then scale-free, "
         'so the encoder cannot lower it by shrinking its latents (collapse instead of discarding '
         'information)'),
    Knob('club_gate', 0.02,
         "lambda3 is scaled by clamp(min(v_gain, CLUB estimate) / this, 0, 1), both read off V before it trains "
         "on the step's pairs (every rank's): CLUB bounds I(x; z) only for a V that fits the true pairs better "
         'than the marginal (v_gain > 0) and than the shuffled pairs (estimate > 0; a true MI is >= 0). Against a '
         "fixed V the encoder lowers the estimate by moving z away from V's predictions, past 0: ungated (with "
         "--club_candidates image), the cifar10 study plan's estimate was < 0 from step ~500 on and train_v_gain "
         'went 0.041, 0.006, -0.013, -0.015 (lambda3 pushed on noise). The gate lets lambda3 act while V keeps up '
         'and backs off when the encoder outruns it. 0: no gate',
         interval='[0, inf)'),
    Knob('club_gate_momentum', 0.98,
         "the gate reads exponential moving averages (this momentum, from 0 at the start, so lambda3 waits for V's "
         "gain to build up) of V's held-out gain and the CLUB estimate, not one batch's: a batch's reading is "
         "noise around the mean (std 0.04-0.18 on CIFAR-10), which kept a per-batch gate at ~0.2 while the mean "
         "gain was ~0 and falling (cifar10 plan, epoch 3). Kept in the checkpoint (buffer club_fit), so a resumed "
         "run gates as the uninterrupted one. 0: the step's own readings",
         interval='[0, 1)'),
    Knob('club_sampled', False,
         'CLUB with one random partner per pair instead of the closed-form mean over all pairs of the '
         "group (drawn on the device from each rank's own generator: runs then differ with the GPU count)"),
    Knob('w_rec', 1.0,
         'weight of the reconstruction loss (lambda1 in reading A)',
         interval='[0, inf)'),
    Knob('w_max', 1.0,
         'weight of the max-MI InfoNCE loss (lambda2 in reading A, lambda1 in B)',
         interval='[0, inf)'),
    Knob('w_min', 10.0,
         'weight of the CLUB min-MI loss (lambda3 = 10 in reading A, the default; lambda2 = 1 in reading '
         'B: use --w_min 1 --w_v 10)',
         interval='[0, inf)'),
    Knob('w_v', 1.0,
         "weight of V's negative log-likelihood (1 in reading A; lambda3 = 10 in reading B)",
         interval='[0, inf)'),
)


class GaussianVariationalNet(nn.Module):
    """V: q_theta(t | s) = N(mu(s), diag exp(logvar(s))), two MLP heads. The log-variance is
    `logvar_bound * tanh(raw / logvar_bound)`: slope 1 at 0 and kept in (-bound, bound), so sigma^2 cannot
    collapse to 0 on a step that overfits. bound 1 is CLUB's reference head (plain tanh)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int, logvar_bound: float = 1.0):
        super().__init__()
        self.logvar_bound = logvar_bound
        self.mu = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))
        self.logvar = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mu(x), self.logvar_bound * torch.tanh(self.logvar(x) / self.logvar_bound)


class MIMaskedAutoencoderViT(MaskedAutoencoderViT):
    knobs = MI_MAE_KNOBS
    state_added_later = ("club_fit",)  # checkpoints before --club_gate_momentum (2026-12-07) lack it

    def __init__(self, *, num_masks: int, mask_mode: str, mi_temperature: float, mi_feat: str, mi_proj: str,
                 nce_gather: bool, v_hidden: int, v_logvar_bound: float, v_lr_scale: float, v_lr_schedule: str,
                 v_steps: int, club_level: str, club_candidates: str, club_dir: str, club_standardize: bool,
                 club_gate: float, club_gate_momentum: float, club_sampled: bool, w_rec: float, w_max: float, w_min: float, w_v: float, **kwargs):
        super().__init__(**kwargs)
        check_mi_mae(self.num_patches, self.mask_ratio, num_masks, mask_mode, w_max, w_min, w_v, club_level,
                     club_candidates)
        self.num_masks, self.mask_mode, self.mi_temperature = num_masks, mask_mode, mi_temperature
        self.mi_feat, self.nce_gather, self.club_sampled = mi_feat, nce_gather, club_sampled
        self.club_level, self.club_candidates, self.club_dir = club_level, club_candidates, club_dir
        self.club_standardize, self.v_lr_scale, self.v_steps = club_standardize, v_lr_scale, v_steps
        self.v_lr_schedule, self.club_gate, self.club_gate_momentum = v_lr_schedule, club_gate, club_gate_momentum
        self._v_pairs = None  # the last training step's detached (source, target) pairs, for --v_steps
        self.weights = {"rec": w_rec, "max_mi": w_max, "min_mi": w_min, "v_nll": w_v}
        dim = self.cls_token.shape[-1]
        # Heads of zero-weight terms are not built: under DDP a parameter outside the graph stops the gradient
        # reduction ("Expected to have finished reduction"), and an untrained head would log noise.
        self.mi_projector = self.variational = None
        # No bias before the BatchNorm (MoCo v3's heads): its gradient is zero in exact arithmetic, so Adam would
        # turn float noise into steps of the size of the lr.
        if w_max > 0:
            if mi_proj == "mlp":
                self.mi_projector = nn.Sequential(nn.Linear(dim, 2048, bias=False), GlobalBatchNorm1d(2048), nn.ReLU(),
                                                  nn.Linear(2048, 256))
            else:
                self.mi_projector = nn.Identity()
        if w_min > 0 or w_v > 0:
            # x: a patch's norm-pix values (patch level) or the mean embedding of a mask's visible patches (mask level)
            x_dim = self.patch_size**2 * self.in_chans if club_level == "patch" else dim
            in_dim, out_dim = (x_dim, dim) if club_dir == "z_given_x" else (dim, x_dim)
            self.variational = GaussianVariationalNet(in_dim, out_dim, v_hidden, v_logvar_bound)
            # the gate's running (v_gain, CLUB estimate); equal on every rank (all-reduced readings)
            self.register_buffer("club_fit", torch.zeros(2))
        for module in (self.mi_projector, self.variational):
            if module is not None:
                module.apply(self._init_module)

    @property
    def club_negatives(self) -> str:
        """The negatives argument of util.mi_losses' CLUB bounds: each image's pairs, or every pair of the batch."""
        return "group" if self.club_candidates == "image" else "all"

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
        """MAE's groups for everything but V; V trains in its own group: no weight decay, `v_lr_scale` times the
        main lr on its own schedule (`v_lr_schedule`), so that it tracks the moving latents (CLUB needs q near its
        optimum), and outside --clip_grad."""
        groups = super().param_groups(weight_decay)
        if self.variational is None:
            return groups
        v_params = set(self.variational.parameters())
        for group in groups:
            group["params"] = [p for p in group["params"] if p not in v_params]
        # not clipped by --clip_grad (engine_pretrain.clipped_parameters): V's NLL is an estimator's loss, whose
        # gradient norm must not set the encoder's clipping factor
        return groups + [{"params": list(self.variational.parameters()), "weight_decay": 0.0, "name": "variational",
                          "lr_scale": self.v_lr_scale, "schedule": self.v_lr_schedule, "clip": False}]

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

    def club_pairs(self, tokens: torch.Tensor, pixels: torch.Tensor, latent: torch.Tensor, masking,
                   batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, z), each (B, M, .): the M pairs of each image.

        patch: x_a a visible patch's norm-pix values, z_a its latent token (M = N * n_v).
        mask: x_j the mean embedding (patch + position, detached) of mask j's visible patches, z_j its pooled
        latent (M = N masks)."""
        if self.club_level == "patch":
            x = gather_tokens(normalize_patches(pixels).repeat_interleave(self.num_masks, dim=0), masking.ids_keep)
            return x.reshape(batch, -1, x.shape[-1]), latent[:, 1:].reshape(batch, -1, latent.shape[-1])
        x = gather_tokens(tokens.detach(), masking.ids_keep).mean(dim=1)
        z = latent[:, 1:].mean(dim=1)
        return x.reshape(batch, -1, x.shape[-1]), z.reshape(batch, -1, z.shape[-1])

    def min_mi_terms(self, x: torch.Tensor, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """CLUB's bound on I(x; z) (gradient to the encoder only, V fixed), V's NLL (gradient to V only), V's gain on
        these pairs, which it has not trained on yet, and with --club_gate the share of the min-MI weight it earns."""
        if self.club_standardize:
            z = standardize(z)
        source, target = (x, z) if self.club_dir == "z_given_x" else (z, x)
        if self.training and self.v_steps > 0:
            self._v_pairs = (source.detach().to(self.cls_token.dtype), target.detach())
        mu, logvar = self.variational(source.detach().to(self.cls_token.dtype))
        v_nll = -gaussian_log_likelihood(target.detach(), mu, logvar).mean()
        marginal = marginal_gaussian_nll(target.detach())
        terms = {"v_nll": v_nll, "v_gain": marginal - v_nll.detach()}
        if self.weights["min_mi"] > 0:
            if self.club_dir == "z_given_x":  # V's outputs detached
                mu, logvar = mu.detach(), logvar.detach()
            else:  # z is V's input here: V's parameters are held fixed instead
                frozen = {name: param.detach() for name, param in self.variational.named_parameters()}
                mu, logvar = functional_call(self.variational, frozen, (source,))
            bound = club_upper_bound_sampled if self.club_sampled else club_upper_bound
            terms["min_mi"] = bound(target, mu, logvar, self.club_negatives)
            if self.club_gate > 0:  # V's fit on every rank's pairs, which it has not trained on: one gate for all
                v_nll_all, estimate = all_reduce_mean(torch.stack([v_nll.detach().float(), terms["min_mi"].detach()]))
                fit = torch.stack([marginal.detach() - v_nll_all, estimate])
                if self.club_gate_momentum > 0:
                    if self.training:
                        self.club_fit.lerp_(fit, 1 - self.club_gate_momentum)
                    fit = self.club_fit
                terms["club_gate"] = fit_gate(fit[0], fit[1], self.club_gate)
        else:  # the estimate alone, a diagnostic: V has been fitted, nothing flows back
            with torch.no_grad():
                terms["min_mi"] = club_upper_bound(target.detach(), mu.detach(), logvar.detach(), self.club_negatives)
        return terms

    def estimator_losses(self):
        """--v_steps extra NLL losses of V on the last training step's detached pairs (CLUB's reference trains
        its estimator apart from the model; V then stays near its optimum while the encoder moves)."""
        pairs, self._v_pairs = self._v_pairs, None
        if pairs is None:
            return
        for _ in range(self.v_steps):
            mu, logvar = self.variational(pairs[0])
            yield -gaussian_log_likelihood(pairs[1], mu, logvar).mean()

    def forward(self, imgs: torch.Tensor, noise: Optional[torch.Tensor] = None) -> PretrainOutput:
        batch, num_masks = imgs.shape[0], self.num_masks
        masking = random_masking(self.mask_noise(self.draw_noise(imgs) if noise is None else noise), self.mask_ratio)
        # One patch embedding per image, shared by its N masks; the B*N sequences run as one batch.
        tokens = self.embed_patches(imgs).repeat_interleave(num_masks, dim=0)
        latent = self.encode(tokens, masking.ids_keep)  # (B*N, 1 + n_v, D)
        pred = self.decode(latent, masking.ids_restore)
        pixels = patchify(imgs, self.patch_size)
        target = normalize_patches(pixels) if self.norm_pix_loss else pixels
        losses = {"rec": masked_mse_loss(pred, target.repeat_interleave(num_masks, dim=0), masking.mask)}
        terms = {}
        if self.mi_projector is not None:
            losses["max_mi"], terms["nce_acc"] = self.max_mi_loss(latent, batch)
        if self.variational is not None:
            x, z = self.club_pairs(tokens, pixels, latent, masking, batch)
            min_mi = self.min_mi_terms(x, z)
            losses["v_nll"], terms["v_gain"] = min_mi["v_nll"], min_mi["v_gain"]
            (losses if self.weights["min_mi"] > 0 else terms)["min_mi"] = min_mi["min_mi"]
            if "club_gate" in min_mi:
                terms["club_gate"] = min_mi["club_gate"]
        gates = {"min_mi": terms.get("club_gate", 1.0)}
        loss = sum(self.weights[name] * gates.get(name, 1.0) * value for name, value in losses.items())
        terms = {**{name: value.detach() for name, value in losses.items()}, **terms}
        # raw (not standardised) std of an image's latent tokens: watch for over-compression
        terms["latent_std"] = latent[:, 1:].detach().float().reshape(batch, -1, latent.shape[-1]).std(dim=1).mean()
        features = latent[:, 0].reshape(batch, num_masks, -1).mean(dim=1)  # cls, averaged over the masks
        return PretrainOutput(loss, terms, features)

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, noise: Optional[torch.Tensor] = None):
        """The first mask's reconstruction (MAE's), for the visualisation grid."""
        noise = self.draw_noise(imgs) if noise is None else noise
        return super().reconstruct(imgs, noise[:, : self.num_patches])


@model_factory
def mi_mae_vit_base_patch16(**kwargs) -> MIMaskedAutoencoderViT:
    return build_mae("vit_base_patch16", MIMaskedAutoencoderViT, **kwargs)


@model_factory
def mi_mae_vit_large_patch16(**kwargs) -> MIMaskedAutoencoderViT:
    return build_mae("vit_large_patch16", MIMaskedAutoencoderViT, **kwargs)


@model_factory
def mi_mae_vit_huge_patch14(**kwargs) -> MIMaskedAutoencoderViT:
    return build_mae("vit_huge_patch14", MIMaskedAutoencoderViT, **kwargs)


@model_factory
def mi_mae_vit_tiny_patch4(**kwargs) -> MIMaskedAutoencoderViT:
    return build_mae("vit_tiny_patch4", MIMaskedAutoencoderViT, **kwargs)


@model_factory
def mi_mae_vit_small_patch4(**kwargs) -> MIMaskedAutoencoderViT:
    return build_mae("vit_small_patch4", MIMaskedAutoencoderViT, **kwargs)


def mi_mae_run_label(args: dict) -> str:
    """MI-MAE with every MI weight at 0 is MAE (one mask) or the compute-matched MAE x N control."""
    if args["w_max"] == 0 and args["w_min"] == 0:
        return "MAE" if args["num_masks"] == 1 else f"MAE x {args['num_masks']} (no MI)"
    return "MI-MAE"


def check_mi_mae(num_patches: int, mask_ratio: float, num_masks: int, mask_mode: str, w_max: float, w_min: float,
                 w_v: float, club_level: str, club_candidates: str) -> None:
    """The checks that involve several flags (each value's own type and range are its knob's); ValueError."""
    if mask_mode == "orthogonal":
        check_num_masks(num_patches, num_masks, mask_ratio)
    if num_masks == 1 and w_max > 0:
        raise ValueError("--w_max > 0 needs --num_masks >= 2: with one mask an image has no positive pair")
    if w_min > 0 and w_v == 0:
        raise ValueError("--w_min > 0 needs --w_v > 0: the bound is only a bound with a V fitted to the latents")
    if club_level == "mask" and club_candidates == "image" and num_masks < 2:
        raise ValueError("--club_level mask contrasts the N masks of an image: it needs --num_masks >= 2 (or --club_candidates batch)")


def validate_mi_mae_args(args: argparse.Namespace) -> None:
    patch = MAE_SIZES[args.model.removeprefix("mi_mae_")]["patch_size"]
    if args.input_size % patch:
        raise ValueError(f"--input_size {args.input_size} is not divisible by the patch size {patch}")
    check_mi_mae((args.input_size // patch) ** 2, args.mask_ratio, args.num_masks, args.mask_mode, args.w_max,
                 args.w_min, args.w_v, args.club_level, args.club_candidates)


METHODS = (Method(name="MI-MAE", prefix="mi_mae_", common_kwargs=mae_model_kwargs, knobs=MI_MAE_KNOBS,
                  validate=validate_mi_mae_args, run_label=mi_mae_run_label),)
