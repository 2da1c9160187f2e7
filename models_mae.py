"""MAE: a ViT encoder on the visible patches and a light decoder that predicts the removed patches' pixels.

State-dict keys are those of facebookresearch/mae, so official checkpoints load without renaming.
`forward` follows the contract of the one engine: it returns the total loss, a dict of named detached
terms and the encoder's cls features (for the online probe).
"""
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
import torch.utils.checkpoint
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from timm.optim import param_groups_weight_decay

from engine_pretrain import PretrainOutput
from util.mim import gather_tokens, masked_mse_loss, normalize_patches, patchify, random_masking
from util.pos_embed import sincos_2d
from util.spec import Method, model_factory, with_defaults


class MaskedAutoencoderViT(nn.Module):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = False,
        mask_ratio: float = 0.75,
    ):
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie in (0, 1), got {mask_ratio}")
        if img_size % patch_size:
            raise ValueError(f"input size {img_size} is not divisible by the patch size {patch_size}")
        self.patch_size, self.in_chans = patch_size, in_chans
        self.norm_pix_loss, self.mask_ratio = norm_pix_loss, mask_ratio
        norm_layer = partial(nn.LayerNorm, eps=1e-6)

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.num_patches = num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)]
        )
        self.norm = norm_layer(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [
                Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)
        self.grad_checkpointing = False
        self.initialize_weights()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each encoder and decoder block's activations in the backward pass instead of storing them:
        activation memory of one block instead of all, for about one more forward pass of time; same gradients."""
        self.grad_checkpointing = enable

    def initialize_weights(self) -> None:
        grid = int(self.num_patches**0.5)
        self.pos_embed.data.copy_(sincos_2d(self.pos_embed.shape[-1], grid, cls_token=True).unsqueeze(0))
        self.decoder_pos_embed.data.copy_(
            sincos_2d(self.decoder_pos_embed.shape[-1], grid, cls_token=True).unsqueeze(0)
        )
        # The patch-embedding conv is initialised as the Linear it is (MAE, following ViT-JAX).
        weight = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_module)

    @staticmethod
    def _init_module(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # --- pieces, reused by the methods built on MAE -------------------------------------------------
    def run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        """x (B, n, D) through `blocks` in order, checkpointing each block when gradient checkpointing is on."""
        checkpointed = self.grad_checkpointing and torch.is_grad_enabled()
        for block in blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if checkpointed else block(x)
        return x

    def embed_patches(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, D) patch embeddings plus positions (cls excluded), before masking."""
        return self.patch_embed(imgs) + self.pos_embed[:, 1:, :]

    def encode(self, tokens: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Encode the visible tokens (B, L, D)[ids_keep] with the cls token prepended -> (B, 1 + K, D)."""
        x = gather_tokens(tokens, ids_keep)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        return self.norm(self.run_blocks(self.blocks, x))

    def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Latent (B, 1 + K, D) -> predicted pixels (B, L, p*p*C) for every patch (cls dropped)."""
        x = self.decoder_embed(latent)
        batch, num_patches = ids_restore.shape
        mask_tokens = self.mask_token.expand(batch, num_patches + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        patches = gather_tokens(patches, ids_restore)  # back to the original patch order
        x = torch.cat([x[:, :1, :], patches], dim=1) + self.decoder_pos_embed
        x = self.run_blocks(self.decoder_blocks, x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def reconstruction_target(self, imgs: torch.Tensor) -> torch.Tensor:
        target = patchify(imgs, self.patch_size)
        return normalize_patches(target) if self.norm_pix_loss else target

    # Masked sequences the encoder and decoder process per image: the unit of compute for equal-compute budgets.
    sequences_per_image = 1

    @property
    def noise_per_sample(self) -> int:
        """Uniform noise values per image that this model's masks are drawn from (the data loader draws them)."""
        return self.num_patches

    def draw_noise(self, imgs: torch.Tensor) -> torch.Tensor:
        return torch.rand(imgs.shape[0], self.noise_per_sample, device=imgs.device)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: MAE decays all but biases and norm weights (so cls_token and mask_token are decayed)."""
        return param_groups_weight_decay(self, weight_decay)

    def estimator_losses(self):
        """Losses of extra estimator updates after each optimizer step (engine_pretrain.estimator_steps); MAE has none."""
        return ()

    # --- the engine's contract ----------------------------------------------------------------------
    def forward(self, imgs: torch.Tensor, noise: Optional[torch.Tensor] = None) -> PretrainOutput:
        """imgs (B, C, H, W); noise (B, L) uniform, drawn here if None (the data loader passes it for reproducibility)."""
        masking = random_masking(self.draw_noise(imgs) if noise is None else noise, self.mask_ratio)
        latent = self.encode(self.embed_patches(imgs), masking.ids_keep)
        pred = self.decode(latent, masking.ids_restore)
        rec = masked_mse_loss(pred, self.reconstruction_target(imgs), masking.mask)
        return PretrainOutput(rec, {"rec": rec.detach()}, latent[:, 0])

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, noise: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted patches in the target's space (B, L, P) and the mask (B, L), for visualisation."""
        masking = random_masking(self.draw_noise(imgs) if noise is None else noise, self.mask_ratio)
        latent = self.encode(self.embed_patches(imgs), masking.ids_keep)
        return self.decode(latent, masking.ids_restore), masking.mask

    @torch.no_grad()
    def extract_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Cls features (B, D) of the whole image (no masking), for the k-NN monitor."""
        tokens = self.embed_patches(imgs)
        all_ids = torch.arange(tokens.shape[1], device=imgs.device).expand(tokens.shape[0], -1)
        return self.encode(tokens, all_ids)[:, 0]


# Architectures by size; every method built on MAE uses the same table (ImageNet: decoder 512-d, 8 blocks).
MAE_SIZES: dict[str, dict] = {
    "vit_base_patch16": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                             decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "vit_large_patch16": dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16,
                              decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "vit_huge_patch14": dict(img_size=224, patch_size=14, embed_dim=1280, depth=32, num_heads=16,
                             decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    # 32-px images (CIFAR, Fashion-MNIST): 64 patches of 4x4
    "vit_tiny_patch4": dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3,
                            decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4),
    "vit_small_patch4": dict(img_size=32, patch_size=4, embed_dim=384, depth=12, num_heads=6,
                             decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8),
}


def build_mae(size: str, model_class: type = MaskedAutoencoderViT, **kwargs) -> MaskedAutoencoderViT:
    """`model_class` at the architecture `MAE_SIZES[size]`; kwargs override (e.g. img_size) or set the method's
    knobs (`model_class.knobs`: their defaults fill in, each given value is checked against its declaration)."""
    return model_class(**{**MAE_SIZES[size], **with_defaults(getattr(model_class, "knobs", ()), kwargs)})


@model_factory
def mae_vit_base_patch16(**kwargs) -> MaskedAutoencoderViT:
    return build_mae("vit_base_patch16", **kwargs)


@model_factory
def mae_vit_large_patch16(**kwargs) -> MaskedAutoencoderViT:
    return build_mae("vit_large_patch16", **kwargs)


@model_factory
def mae_vit_huge_patch14(**kwargs) -> MaskedAutoencoderViT:
    return build_mae("vit_huge_patch14", **kwargs)


@model_factory
def mae_vit_tiny_patch4(**kwargs) -> MaskedAutoencoderViT:
    return build_mae("vit_tiny_patch4", **kwargs)


@model_factory
def mae_vit_small_patch4(**kwargs) -> MaskedAutoencoderViT:
    return build_mae("vit_small_patch4", **kwargs)


def mae_model_kwargs(args) -> dict:
    """The factory arguments every method built on MAE takes from the common flags."""
    return {"img_size": args.input_size, "norm_pix_loss": args.norm_pix_loss, "mask_ratio": args.mask_ratio}


METHODS = (Method(name="MAE", prefix="mae_", common_kwargs=mae_model_kwargs),)
