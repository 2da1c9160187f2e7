"""Layer-wise lr decay (BEiT/MAE fine-tuning): parameter groups with `lr_scale` = decay^(depth + 1 - layer_id).

timm's `param_groups_layer_decay` numbers layers from the parameters present, so with global pooling (no
final `norm`) its scales shift by one layer against MAE's; this keeps MAE's numbering exactly.
"""
import torch.nn as nn

_NO_DECAY_NAMES = {"pos_embed", "cls_token", "dist_token"}


def layer_id_for_vit(name: str, num_layers: int) -> int:
    """0 for the embedding (cls_token, pos_embed, patch_embed), i + 1 for blocks.i, num_layers for the rest."""
    if name in {"cls_token", "pos_embed"} or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def param_groups_lrd(model: nn.Module, weight_decay: float = 0.05, layer_decay: float = 0.75) -> list[dict]:
    """Parameter groups for AdamW: no weight decay on 1-D params, pos_embed and cls_token; lr_scale by layer."""
    num_layers = len(model.blocks) + 1
    scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim == 1 or name in _NO_DECAY_NAMES
        layer_id = layer_id_for_vit(name, num_layers)
        key = f"layer_{layer_id}_{'no_decay' if no_decay else 'decay'}"
        group = groups.setdefault(
            key, {"lr_scale": scales[layer_id], "weight_decay": 0.0 if no_decay else weight_decay, "params": []}
        )
        group["params"].append(param)
    return list(groups.values())
