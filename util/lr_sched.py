"""MAE's per-iteration schedule: linear warm-up, then half-cosine to min_lr, on the fractional epoch."""
import math

import torch

GROUP_SCHEDULES = ("warmup_cosine", "cosine", "constant")


def lr_at(epoch: float, base_lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """lr at fractional epoch e: base_lr * e / w during warm-up, then
    min_lr + (base_lr - min_lr) * (1 + cos(pi * (e - w) / (E - w))) / 2."""
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-8)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def adjust_learning_rate(optimizer: torch.optim.Optimizer, epoch: float, args) -> float:
    """Set every group's lr at fractional `epoch`; a group's `lr_scale` (layer decay, MI-MAE's V) multiplies it.
    A group's `schedule` (MI-MAE's V) is one of GROUP_SCHEDULES: "warmup_cosine", the main schedule (the default);
    "cosine", its cosine from epoch 0 without the warm-up; "constant", the peak lr throughout. Returns the main lr."""
    lr = lr_at(epoch, args.lr, args.min_lr, args.warmup_epochs, args.epochs)
    for group in optimizer.param_groups:
        schedule = group.get("schedule", "warmup_cosine")
        if schedule == "warmup_cosine":
            group_lr = lr
        elif schedule == "cosine":
            group_lr = lr_at(epoch, args.lr, args.min_lr, 0, args.epochs)
        elif schedule == "constant":
            group_lr = args.lr
        else:
            raise ValueError(f"parameter group schedule must be one of {GROUP_SCHEDULES}, got {schedule!r}")
        group["lr"] = group_lr * group.get("lr_scale", 1.0)
    return lr
