"""The ViT used for fine-tuning and linear probing: timm's VisionTransformer with MAE's key names.

With `global_pool=True` the final `norm` is an identity and `fc_norm` is applied to the mean of the patch
tokens (MAE's fine-tune recipe); with `global_pool=False` the normed cls token is used (MAE's probe recipe).
"""
from functools import partial

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from models_mae import MAE_SIZES
from util.dist import GlobalBatchNorm1d
from util.pos_embed import interpolate_pos_embed
from util.spec import model_factory

# Keys a pre-training checkpoint may carry that the downstream ViT does not use (decoders, method heads).
_ENCODER_PREFIXES = ("patch_embed.", "cls_token", "pos_embed", "blocks.", "norm.")


def _vit(size: str, global_pool: bool = True, **kwargs) -> VisionTransformer:
    """timm's ViT with the encoder of `MAE_SIZES[size]` (one table for both); kwargs override (img_size, depth)."""
    arch = {key: MAE_SIZES[size][key] for key in ("img_size", "patch_size", "embed_dim", "depth", "num_heads")}
    return VisionTransformer(
        mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
        global_pool="avg" if global_pool else "token", **{**arch, **kwargs},
    )


@model_factory
def vit_base_patch16(**kwargs) -> VisionTransformer:
    return _vit("vit_base_patch16", **kwargs)


@model_factory
def vit_large_patch16(**kwargs) -> VisionTransformer:
    return _vit("vit_large_patch16", **kwargs)


@model_factory
def vit_huge_patch14(**kwargs) -> VisionTransformer:
    return _vit("vit_huge_patch14", **kwargs)


@model_factory
def vit_tiny_patch4(**kwargs) -> VisionTransformer:
    return _vit("vit_tiny_patch4", **kwargs)


@model_factory
def vit_small_patch4(**kwargs) -> VisionTransformer:
    return _vit("vit_small_patch4", **kwargs)


class RawPixels(nn.Module):
    """The floor that learnt features must clear: the image's own normalised pixels, flattened, as its features
    (3 x input_size^2 of them). `main_linprobe.py --model pixels` then trains MAE's probe on them, a BatchNorm
    without affine and a linear layer: logistic regression on standardised pixels. Nothing to pre-train or load."""

    def __init__(self, num_classes: int = 1000, img_size: int = 224, global_pool: bool = False, **kwargs):
        super().__init__()
        self.num_features = 3 * img_size * img_size
        self.head = nn.Linear(self.num_features, num_classes)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return features if pre_logits else self.head(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


@model_factory
def pixels(**kwargs) -> RawPixels:
    return RawPixels(**kwargs)


def batchnorm_head(linear: nn.Linear) -> nn.Sequential:
    """MAE's probe head: a BatchNorm without affine in front of `linear`. It standardises each feature over the
    batch, so a large per-feature offset of the pre-trained features (which a LayerNorm over the features keeps)
    cannot drown what varies between images. Global: the statistics are the whole batch's on any number of ranks."""
    return nn.Sequential(GlobalBatchNorm1d(linear.in_features, affine=False, eps=1e-6), linear)


def load_pretrained_encoder(model: VisionTransformer, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Load the encoder part of a pre-training state dict (MAE or any method built on it) into `model`.

    Decoder and method-specific keys are dropped, the position table is resized to the model's grid, and
    the only keys allowed to stay missing are the new head (and `fc_norm` with global pooling).
    Returns the missing keys. Raises a ValueError naming the first key whose shape does not fit.
    """
    encoder = {k: v for k, v in state_dict.items() if k.startswith(_ENCODER_PREFIXES)}
    if not encoder:
        raise ValueError("the checkpoint holds no encoder keys (patch_embed.*, blocks.*, ...): is it a ViT/MAE checkpoint?")
    if "pos_embed" in encoder:
        encoder["pos_embed"] = interpolate_pos_embed(encoder["pos_embed"], model.patch_embed.num_patches)
    if isinstance(model.norm, nn.Identity):  # global pooling: the pre-training `norm` is replaced by fc_norm
        encoder = {k: v for k, v in encoder.items() if not k.startswith("norm.")}
    own = model.state_dict()
    for key, value in encoder.items():
        if key not in own:
            raise ValueError(f"checkpoint key {key!r} has no place in {type(model).__name__}")
        if own[key].shape != value.shape:
            raise ValueError(f"shape mismatch at {key!r}: checkpoint {tuple(value.shape)}, model {tuple(own[key].shape)}")
    result = model.load_state_dict(encoder, strict=False)
    allowed = ("head.", "fc_norm.")
    unexpected_missing = [k for k in result.missing_keys if not k.startswith(allowed)]
    if unexpected_missing:
        raise ValueError(f"the checkpoint lacks encoder keys: {unexpected_missing[:5]}")
    return result.missing_keys
