"""MAE's per-iteration schedule: linear warm-up, then half-cosine to min_lr, on the fractional epoch."""
import math

import torch


def lr_at(epoch: float, base_lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """lr at fractional epoch e: base_lr * e / w during warm-up, then
    min_lr + (base_lr - min_lr) * (1 + cos(pi * (e - w) / (E - w))) / 2."""
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-8)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def adjust_learning_rate(optimizer: torch.optim.Optimizer, epoch: float, args) -> float:
    """Set every group's lr at fractional `epoch`; a group's `lr_scale` (layer decay, MI-MAE's V) multiplies it,
    and a group with `warmup: False` skips the warm-up (its cosine starts at epoch 0). Returns the main lr."""
    lr = lr_at(epoch, args.lr, args.min_lr, args.warmup_epochs, args.epochs)
    for group in optimizer.param_groups:
        group_lr = lr if group.get("warmup", True) else lr_at(epoch, args.lr, args.min_lr, 0, args.epochs)
        group["lr"] = group_lr * group.get("lr_scale", 1.0)
    return lr
