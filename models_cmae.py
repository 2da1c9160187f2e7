"""CMAE of Mao, Yin, Chang and Zhou, "Improvements to Self-Supervised Representation Learning for Masked Image
Modeling" (arXiv 2205.10546): MAE with (1) a smaller decoder, (2) tasks for the encoder alone, an NT-Xent loss
between two views and the prediction of the patch index of visible tokens whose positional embedding is
withheld, and (3) ContrastiveCrop views (util/contrastive_crop.py).

Not Huang et al.'s CMAE ("Contrastive Masked Autoencoders are Stronger Vision Learners": momentum encoder,
pixel-shifted views); nothing of it is here. Only Mao et al.'s abstract is known, so every default is the
project's reading (docs/methods/cmae.md). The encoder's keys are MAE's; `no_pos_embed`, `con_projector.*`
and `pos_head.*` are dropped by fine-tuning and probing like the decoder.
"""
import argparse
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine_pretrain import PretrainOutput
from models_mae import MaskedAutoencoderViT, build_mae, mae_model_kwargs
from util.cmae_losses import nt_xent_loss, position_cross_entropy
from util.contrastive_crop import ContrastiveCropData
from util.dist import GlobalBatchNorm1d, gather_with_grad
from util.mim import masked_mse_loss, num_visible, random_masking
from util.spec import Knob, Method, model_factory

POS_TASKS = ("abs", "none")
HEATMAPS = ("sum", "norm")

# The reduced decoders (reading): ViT-B/L/H 2 blocks x 256 wide, 8 heads (MAE: 8 x 512, 16 heads); the 32-px
# models, whose MAE decoder is already narrow (4 x 128 / 4 x 256), 2 x 128 with 4 heads.
CMAE_DECODERS: dict[str, dict] = {
    "vit_base_patch16": dict(decoder_depth=2, decoder_embed_dim=256, decoder_num_heads=8),
    "vit_large_patch16": dict(decoder_depth=2, decoder_embed_dim=256, decoder_num_heads=8),
    "vit_huge_patch14": dict(decoder_depth=2, decoder_embed_dim=256, decoder_num_heads=8),
    "vit_tiny_patch4": dict(decoder_depth=2, decoder_embed_dim=128, decoder_num_heads=4),
    "vit_small_patch4": dict(decoder_depth=2, decoder_embed_dim=128, decoder_num_heads=4),
}


# Each hyper-parameter once (util/spec.py); the crop and box knobs are read by ContrastiveCropData, not the model.
CMAE_KNOBS = (
    Knob('decoder_depth', None,
         "decoder blocks; default: the model's reduced decoder, 2 (MAE: 8 for ViT-B). Sweep {1, 2, 4, 8}",
         type=int, interval='[1, inf)'),
    Knob('decoder_embed_dim', None,
         'decoder width; default: 256 for ViT-B/L/H, 128 for the 32-px models (MAE: 512). Sweep {256, 512}',
         type=int, interval='[1, inf)'),
    Knob('decoder_num_heads', None,
         'decoder attention heads (must divide the width); default: 8 for ViT-B/L/H, 4 for the 32-px '
         'models',
         type=int, interval='[1, inf)'),
    Knob('con_weight', 1.0,
         "lambda_c, weight of the NT-Xent loss between the two views' mean visible-token features "
         '(projected by Linear-BN-ReLU-Linear to 256-d); 0 drops the term and its head. Sweep {0.1, 0.5, '
         '1}',
         interval='[0, inf)'),
    Knob('con_temperature', 0.2,
         'NT-Xent temperature tau',
         interval='(0, inf)'),
    Knob('pos_task', 'abs',
         'abs: a linear head classifies the patch index of visible tokens whose positional embedding is '
         'replaced by one learned no_pos_embed; none: no position task',
         choices=('abs', 'none')),
    Knob('pos_ratio', 0.25,
         "fraction of each view's visible tokens whose position is withheld and predicted (at least one)",
         interval='(0, 1]'),
    Knob('pos_weight', 1.0,
         'lambda_p, weight of the position cross-entropy; 0: no position task',
         interval='[0, inf)'),
    Knob('rec_views', 2,
         "views reconstructed: 2 averages both views' MAE losses, 1 decodes the first view only",
         choices=(1, 2)),
    Knob('contrastive_crop', True,
         "crop the views with ContrastiveCrop after the warm-up; false: MAE's random resized crops "
         'throughout',
         model_arg=False),
    Knob('crop_alpha', 0.6,
         "Beta(alpha, alpha) law of the crop centre inside the box: < 1 towards the box's edges (more "
         'different views), 1 uniform, > 1 towards its centre (object-centred). ContrastiveCrop: 0.6 '
         'ImageNet, 0.1 CIFAR and 64-px Tiny-ImageNet',
         interval='(0, inf)',
         model_arg=False),
    Knob('box_warmup', None,
         'epochs of plain crops before the boxes are used (full boxes until the first update); default: '
         '20%% of --epochs (ContrastiveCrop: 20 of 100 on ImageNet, 100 of 500 on CIFAR)',
         type=int, interval='[0, inf)',
         model_arg=False),
    Knob('box_update_freq', None,
         'recompute the boxes after every N-th epoch from the warm-up on (not after the last); costs one '
         'encoder pass over the training set; default: 20%% of --epochs',
         type=int, interval='[1, inf)',
         model_arg=False),
    Knob('box_threshold', 0.1,
         'k: the box spans the rows and columns where the normalised heat map exceeds k',
         interval='[0, 1)',
         model_arg=False),
    Knob('box_heatmap', 'sum',
         "heat map of the boxes: sum, the channel sum of the final-norm patch tokens (the spec's reading);"
         ' norm, the L2 norm of the patch tokens before the final LayerNorm. The sum is nearly flat while '
         "the norm's affine weights are near their initial (1, 0), which gives full boxes early in "
         'training',
         choices=('sum', 'norm'),
         model_arg=False),
    Knob('view_color_jitter', False,
         "add SimCLR's colour jitter (0.4, 0.4, 0.4, 0.1, p 0.8) and grayscale (p 0.2) to both views; the "
         'reconstruction target is then the jittered view',
         model_arg=False),
)


class ContrastiveMaskedAutoencoderViT(MaskedAutoencoderViT):
    """loss = rec + con_weight * NT-Xent(u^1, u^2) + pos_weight * CE(position), on two views per image.

    Input (B, 2, C, H, W); each view is masked independently (noise (B, 2L): view 1's L values, then view 2's).
    In each view the first Q = max(1, floor(K pos_ratio)) of the K visible tokens in the mask's random order
    (a uniformly random subset) get `no_pos_embed` instead of their sin-cos position, and a linear head on their
    encoder outputs classifies the patch index; the decoder still adds its own positions to them.
    """

    views_per_image = 2
    sequences_per_image = 2  # masked sequences through the encoder per image

    knobs = CMAE_KNOBS

    def __init__(self, *, con_weight: float, con_temperature: float, pos_task: str, pos_ratio: float, pos_weight: float,
                 rec_views: int, proj_hidden: int = 2048, proj_dim: int = 256, **kwargs):
        super().__init__(**kwargs)
        self.con_weight, self.con_temperature = con_weight, con_temperature
        self.pos_weight, self.rec_views = pos_weight, rec_views
        dim = self.cls_token.shape[-1]
        # Parts whose loss is off are not built: DDP refuses parameters that get no gradient.
        self.con_projector = None
        if con_weight > 0:  # SimCLR's head; no bias before the BatchNorm (MoCo v3): its gradient is zero but for float noise
            self.con_projector = nn.Sequential(nn.Linear(dim, proj_hidden, bias=False), GlobalBatchNorm1d(proj_hidden), nn.ReLU(),
                                               nn.Linear(proj_hidden, proj_dim))
            self.con_projector.apply(self._init_module)
        self.num_position_tokens = 0
        if pos_task == "abs" and pos_weight > 0:
            self.num_position_tokens = max(1, int(num_visible(self.num_patches, self.mask_ratio) * pos_ratio))
            self.no_pos_embed = nn.Parameter(torch.zeros(1, 1, dim))
            nn.init.normal_(self.no_pos_embed, std=0.02)
            self.pos_head = nn.Linear(dim, self.num_patches)
            self.pos_head.apply(self._init_module)

    @property
    def noise_per_sample(self) -> int:
        return self.views_per_image * self.num_patches

    def embed_patches_withholding(self, imgs: torch.Tensor, withheld: torch.Tensor) -> torch.Tensor:
        """(R, C, H, W) -> (R, L, D) patch embeddings plus positions, except at the patch indices `withheld`
        (R, Q), which get `no_pos_embed` instead: nothing of their position reaches the encoder."""
        rows, dim = imgs.shape[0], self.pos_embed.shape[-1]
        positions = self.pos_embed[:, 1:, :].expand(rows, -1, -1)
        positions = positions.scatter(1, withheld.unsqueeze(-1).expand(-1, -1, dim),
                                      self.no_pos_embed.expand(rows, withheld.shape[1], -1).to(positions.dtype))
        return self.patch_embed(imgs) + positions

    def forward(self, imgs: torch.Tensor, noise: Optional[torch.Tensor] = None) -> PretrainOutput:
        if imgs.ndim != 5 or imgs.shape[1] != self.views_per_image:
            raise ValueError(f"CMAE takes two views per image, (B, 2, C, H, W), got {tuple(imgs.shape)}: train it "
                             f"with main_pretrain.py, whose data hooks make the views")
        batch, num_patches = imgs.shape[0], self.num_patches
        noise = self.draw_noise(imgs) if noise is None else noise
        # rows 0..B-1: the first views, B..2B-1: the second views
        views = imgs.transpose(0, 1).flatten(0, 1)
        masking = random_masking(noise.view(batch, 2, num_patches).transpose(0, 1).reshape(2 * batch, num_patches),
                                 self.mask_ratio)
        withheld = masking.ids_keep[:, :self.num_position_tokens]
        if self.num_position_tokens:
            tokens = self.embed_patches_withholding(views, withheld)
        else:
            tokens = self.embed_patches(views)
        latent = self.encode(tokens, masking.ids_keep)  # (2B, 1 + K, D), the withheld tokens first after cls

        rows = slice(None) if self.rec_views == 2 else slice(0, batch)
        pred = self.decode(latent[rows], masking.ids_restore[rows])
        # equal masked counts per view: the mean over both views' masked patches is (l(x^1) + l(x^2)) / 2
        rec = masked_mse_loss(pred, self.reconstruction_target(views[rows]), masking.mask[rows])
        loss, terms = rec, {"rec": rec.detach()}
        if self.con_projector is not None:
            u = F.normalize(self.con_projector(latent[:, 1:].mean(dim=1)).float(), dim=-1)
            # negatives from every rank; the gather's backward sums gradients over ranks
            con, con_acc = nt_xent_loss(gather_with_grad(u[:batch]), gather_with_grad(u[batch:]), self.con_temperature)
            loss = loss + self.con_weight * con
            terms.update(con=con.detach(), con_acc=con_acc)
        if self.num_position_tokens:
            logits = self.pos_head(latent[:, 1:1 + self.num_position_tokens])
            pos, pos_acc = position_cross_entropy(logits, withheld)
            loss = loss + self.pos_weight * pos
            terms.update(pos=pos.detach(), pos_acc=pos_acc)
        return PretrainOutput(loss, terms, latent[:batch, 0])

    @torch.no_grad()
    def patch_heatmaps(self, imgs: torch.Tensor, kind: str = "sum") -> torch.Tensor:
        """ContrastiveCrop's heat maps (B, h, w) of whole images (mask ratio 0, every position embedded).

        sum: the channel sum of the final-norm patch tokens (the reading of ContrastiveCrop's sum over a conv
        feature map). A LayerNorm output sums to sum(beta) + sum((gamma - 1) x_hat) per token, so this map is flat
        until the norm's affine weights have moved; norm: the L2 norm of the last block's patch tokens before the
        final norm, the activation energy that the ResNet map measures.
        """
        if kind not in HEATMAPS:
            raise ValueError(f"--box_heatmap must be one of {HEATMAPS}, got {kind!r}")
        tokens = self.embed_patches(imgs)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(tokens.shape[0], -1, -1)
        patches = self.run_blocks(self.blocks, torch.cat([cls, tokens], dim=1))[:, 1:].float()
        heat = self.norm(patches).sum(dim=-1) if kind == "sum" else patches.norm(dim=-1)
        grid = int(self.num_patches**0.5)
        return heat.view(-1, grid, grid)


def build_cmae(size: str, **kwargs) -> ContrastiveMaskedAutoencoderViT:
    """CMAE at MAE's encoder `size` with the reduced decoder; kwargs override (e.g. --decoder_depth)."""
    return build_mae(size, ContrastiveMaskedAutoencoderViT, **{**CMAE_DECODERS[size], **kwargs})


@model_factory
def cmae_vit_base_patch16(**kwargs) -> ContrastiveMaskedAutoencoderViT:
    return build_cmae("vit_base_patch16", **kwargs)


@model_factory
def cmae_vit_large_patch16(**kwargs) -> ContrastiveMaskedAutoencoderViT:
    return build_cmae("vit_large_patch16", **kwargs)


@model_factory
def cmae_vit_huge_patch14(**kwargs) -> ContrastiveMaskedAutoencoderViT:
    return build_cmae("vit_huge_patch14", **kwargs)


@model_factory
def cmae_vit_tiny_patch4(**kwargs) -> ContrastiveMaskedAutoencoderViT:
    return build_cmae("vit_tiny_patch4", **kwargs)


@model_factory
def cmae_vit_small_patch4(**kwargs) -> ContrastiveMaskedAutoencoderViT:
    return build_cmae("vit_small_patch4", **kwargs)


def validate_cmae_args(args: argparse.Namespace) -> None:
    """The checks that involve several flags (each value's own type and range are its knob's)."""
    width = args.decoder_embed_dim or CMAE_DECODERS[args.model.removeprefix("cmae_")]["decoder_embed_dim"]
    heads = args.decoder_num_heads or CMAE_DECODERS[args.model.removeprefix("cmae_")]["decoder_num_heads"]
    if width % heads:
        raise ValueError(f"--decoder_num_heads {heads} does not divide --decoder_embed_dim {width}")
    if args.con_weight > 0 and args.batch_size < 2:
        raise ValueError("--con_weight > 0 trains a BatchNorm in the projection head and needs other images as "
                         "negatives: --batch_size must be at least 2")


def cmae_run_label(args: dict) -> str:
    """CMAE (Mao), or which of its parts an ablation leaves out."""
    off = [part for part, is_off in (
        ("contrastive", args["con_weight"] == 0),
        ("position", args["pos_task"] == "none" or args["pos_weight"] == 0),
        ("ContrastiveCrop", not args["contrastive_crop"])) if is_off]
    return "CMAE (Mao)" + (f" without {', '.join(off)}" if off else "")


METHODS = (Method(name="CMAE (Mao)", prefix="cmae_", common_kwargs=mae_model_kwargs, knobs=CMAE_KNOBS,
                  validate=validate_cmae_args, run_label=cmae_run_label, train_data=ContrastiveCropData),)
