"""Supervised training and evaluation for fine-tuning and linear probing (top-1 / top-5)."""
import time
from contextlib import nullcontext
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn

from engine_pretrain import optimizer_step
from util.lr_sched import adjust_learning_rate
from util.metrics import Progress, RunningTerms, accuracy
from util.precision import autocast_for


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    data_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    epoch: int,
    scaler: Optional[torch.amp.GradScaler],
    args,
    mixup_fn: Optional[Callable] = None,
    log_writer=None,
) -> dict[str, float]:
    model.train(True)
    distributed = isinstance(model, nn.parallel.DistributedDataParallel)
    steps_per_epoch = len(data_loader)
    running = RunningTerms(device)
    progress = Progress(steps_per_epoch, f"Epoch: [{epoch}]")
    optimizer.zero_grad(set_to_none=True)
    lr = optimizer.param_groups[0]["lr"]
    for step, (samples, targets) in enumerate(data_loader):
        if step % args.accum_iter == 0:
            lr = adjust_learning_rate(optimizer, epoch + step / steps_per_epoch, args)
        samples, targets = samples.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        boundary = (step + 1) % args.accum_iter == 0
        with model.no_sync() if distributed and not boundary else nullcontext():
            with autocast_for(device, args.amp):
                loss = criterion(model(samples), targets)
            scaled = loss / args.accum_iter
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if boundary:
            optimizer_step(model, optimizer, scaler, args.clip_grad)
        running.add({"loss": loss.detach()}, step)
        if (step + 1) % args.print_freq == 0 or step + 1 == steps_per_epoch:
            running.check_finite()
            means = running.means()
            print(progress.line(step, {"lr": lr, **means}), flush=True)
            if log_writer is not None:
                epoch_1000x = int((epoch + (step + 1) / steps_per_epoch) * 1000)
                log_writer.add_scalar("train/loss", means["loss"], epoch_1000x)
                log_writer.add_scalar("train/lr", lr, epoch_1000x)
    return {"lr": lr, **running.means()}


@torch.no_grad()
def evaluate(model: nn.Module, data_loader: Iterable, device: torch.device, amp: str) -> dict[str, float]:
    """Cross-entropy and top-1/top-5 accuracy (%) over the loader, averaged over ranks."""
    model.eval()
    criterion = nn.CrossEntropyLoss()
    running = RunningTerms(device)
    start = time.time()
    for step, (samples, targets) in enumerate(data_loader):
        samples, targets = samples.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast_for(device, amp):
            logits = model(samples)
        acc1, acc5 = accuracy(logits.float(), targets, topk=(1, 5))
        # Weight every batch by its size so a short last batch counts for what it holds.
        size = torch.tensor(float(targets.shape[0]), device=device)
        running.add({"loss": criterion(logits.float(), targets) * size, "acc1": acc1 * size, "acc5": acc5 * size,
                     "count": size}, step)
    sums = {k: v * running.count for k, v in running.means().items()}
    count = max(sums.pop("count"), 1.0)
    stats = {k: v / count for k, v in sums.items()}
    print(f"* acc@1 {stats['acc1']:.3f} acc@5 {stats['acc5']:.3f} loss {stats['loss']:.3f} ({time.time() - start:.1f}s)")
    return stats
