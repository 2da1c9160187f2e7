"""The downstream engine, shared by main_finetune.py and main_linprobe.py: their common flags, building the ViT
from a pre-training checkpoint, supervised training and evaluation (top-1 / top-5), and the epoch loop with
checkpoints and log lines."""
import argparse
import hashlib
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset
from torch.utils.tensorboard import SummaryWriter

from engine_pretrain import optimizer_step
from models_vit import load_pretrained_encoder
from util.batch import add_batch_args
from util.checkpoint import RunState, load_checkpoint, load_resume_checkpoint, model_state_from
from util.config import bool_flag
from util.datasets import DATASETS, class_balanced_subset, dataset_labels, subset
from util.dist import DistInfo, data_parallel, is_main_process
from util.dry_run import GpuType, add_dry_run_args, dry_run_report
from util.lr_sched import adjust_learning_rate
from util.metrics import Progress, RunningTerms, accuracy
from util.precision import add_precision_args, autocast_for, grad_scaler_for
from util.registry import create_model, list_models
from util.run import append_log, default_workers, seed_everything, truncate_log


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
            means = running.means()  # raises on every rank if one saw a non-finite loss
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
    means = running.means(raise_non_finite=False)  # of size-weighted values: their ratio to the mean size is the per-image mean
    size = max(means.pop("count"), 1e-12)
    stats = {k: v / size for k, v in means.items()}
    print(f"* acc@1 {stats['acc1']:.3f} acc@5 {stats['acc5']:.3f} loss {stats['loss']:.3f} ({time.time() - start:.1f}s)")
    return stats


def add_common_args(parser: argparse.ArgumentParser, *, batch_size: int, epochs: int, blr: float,
                    weight_decay: float, warmup_epochs: int, global_pool: bool) -> None:
    """Flags shared by main_finetune.py and main_linprobe.py, with each script's recipe defaults."""
    parser.add_argument("--config", default="", help="YAML file whose keys set these flags' defaults; the command line overrides it")
    group = parser.add_argument_group("optimisation")
    add_batch_args(group, batch_size, "images per process (with --effective_batch: the most, what fits in memory); "
                                      "effective batch = batch_size x accum_iter x processes")
    group.add_argument("--epochs", default=epochs, type=int, help="training epochs")
    group.add_argument("--weight_decay", default=weight_decay, type=float, help="weight decay on weight matrices (none on biases, norms, pos_embed, cls_token)")
    group.add_argument("--lr", default=None, type=float, help="absolute lr; default blr x effective batch / 256")
    group.add_argument("--blr", default=blr, type=float, help="base lr per 256 images")
    group.add_argument("--min_lr", default=0.0, type=float, help="floor of the cosine schedule")
    group.add_argument("--warmup_epochs", default=warmup_epochs, type=int, help="linear warm-up epochs (fractional per step)")
    group.add_argument("--clip_grad", default=None, type=float, help="clip the global gradient norm to this")
    add_precision_args(group)  # --amp, --tf32

    group = parser.add_argument_group("model")
    group.add_argument("--model", default="vit_large_patch16",
                       help=f"one of {downstream_models()}; pixels (linear probing only): the raw-pixel floor, the probe "
                            f"on the image's own standardised pixels")
    group.add_argument("--input_size", default=224, type=int, help="image side in pixels")
    group.add_argument("--finetune", default="", help="pre-training checkpoint (ours, or an official MAE .pth) to start from")
    group.add_argument("--global_pool", dest="global_pool", action="store_true", help="classify the mean of the patch tokens (with fc_norm)")
    group.add_argument("--cls_token", dest="global_pool", action="store_false", help="classify the normed cls token")
    parser.set_defaults(global_pool=global_pool)

    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default="imagefolder", choices=DATASETS, help="imagefolder (train/ + val/ or test/), fashion_mnist (IDX files), cifar10/cifar100 (torchvision's files) or tiny_imagenet (the official tiny-imagenet-200 folder, evaluated on its val split); never downloaded")
    group.add_argument("--data_path", default="", help="dataset folder (train/ and val/ or test/ class folders for imagefolder)")
    group.add_argument("--nb_classes", default=None, type=int, help="classes of the head; default: read from the dataset")
    group.add_argument("--subset_size", default=0, type=int, help="train on a fixed random subset of this many images (0: all)")
    group.add_argument("--label_fraction", default=1.0, type=float,
                       help="train on a class-balanced fraction F in (0, 1] of the labelled training images: "
                            "round(F x n_c) of each class's n_c images (halves rounded up), chosen from the labels and "
                            "--seed alone, so every method, model and script of a seed gets the same images (the "
                            "fingerprint printed at start shows it). FT1%% (MI-MAE's Table 1, the low-shot column) is "
                            "main_finetune.py --label_fraction 0.01; the same with main_linprobe.py probes on 1%% of "
                            "the labels. A class that would keep no image is an error. Not with --subset_size: both "
                            "choose the training images")
    group.add_argument("--num_workers", default=default_workers(), type=int, help="data-loading processes per GPU/process")
    group.add_argument("--pin_mem", default=True, type=bool_flag, help="pin host memory for faster GPU copies")

    group = parser.add_argument_group("run")
    group.add_argument("--output_dir", default="./output_dir", help="checkpoints, log.txt, args.yaml")
    group.add_argument("--log_dir", default=None, help="TensorBoard folder (default: output_dir)")
    group.add_argument("--device", default="cuda", help="cuda or cpu; falls back to the CPU when no GPU is present")
    group.add_argument("--seed", default=0, type=int, help="seed of weights, data order, augmentation and masks (each sample's randomness depends on seed, epoch and index only)")
    group.add_argument("--resume", default="", help="checkpoint to resume from (default: output_dir/checkpoint-last.pth)")
    group.add_argument("--auto_resume", default=True, type=bool_flag, help="resume from output_dir/checkpoint-last.pth when it exists")
    group.add_argument("--save_freq", default=0, type=int, help="keep checkpoint-<epoch>.pth every N epochs (0: only the last)")
    group.add_argument("--eval_freq", default=1, type=int,
                       help="evaluate on the val split every N epochs and after the last: on a CPU the 10,000 test "
                            "images of a small data set can cost more than a short epoch of training")
    group.add_argument("--eval", action="store_true", help="only evaluate --resume (or --finetune) on the val split")
    group.add_argument("--print_freq", default=20, type=int, help="steps between console lines (the only host syncs inside an epoch)")
    group.add_argument("--dist_timeout", default=1800, type=int, help="seconds before a collective waiting on a dead rank fails")
    group.add_argument("--dist_eval", action="store_true",
                       help="accepted for the official MAE commands, which pass it; evaluation here is always distributed "
                            "(each rank scores its shard of the val split and the counts are summed), so it changes nothing")
    add_dry_run_args(parser)


def downstream_models() -> list[str]:
    return [*list_models("vit_"), "pixels"]


def validate_common_args(args, parser: argparse.ArgumentParser) -> None:
    if args.batch_size < 1 or (args.accum_iter is not None and args.accum_iter < 1) or args.effective_batch < 0:
        parser.error("--batch_size and --accum_iter must be positive, --effective_batch non-negative")
    if args.model not in downstream_models():
        parser.error(f"--model: unknown model {args.model!r}; choose one of {downstream_models()}")
    if args.model == "pixels" and args.finetune:
        parser.error("--model pixels probes the raw pixels: there is no encoder to load with --finetune")
    if args.dry_run:  # prices a run before its data and checkpoint are at hand
        return
    if not args.data_path or not Path(args.data_path).exists():
        parser.error(f"--data_path: no such folder: {args.data_path!r}")
    if args.finetune and not Path(args.finetune).is_file():
        parser.error(f"--finetune: no such file: {args.finetune}")
    if args.resume and not Path(args.resume).is_file():
        parser.error(f"--resume: no such file: {args.resume}")
    if not 0.0 < args.label_fraction <= 1.0:
        parser.error(f"--label_fraction must lie in (0, 1] (1: every training image), got {args.label_fraction}")
    if args.eval_freq < 1:
        parser.error(f"--eval_freq must be >= 1 (epochs between evaluations; the last epoch is always evaluated), got {args.eval_freq}")
    if args.label_fraction < 1.0 and args.subset_size > 0:
        parser.error(f"--label_fraction {args.label_fraction} and --subset_size {args.subset_size} both choose the "
                     f"training images; set one (--label_fraction alone takes its fraction of every class of the "
                     f"whole training split)")


def training_images(train_set: Dataset, args, world_size: int) -> Dataset:
    """The training images that --subset_size or --label_fraction select (all by default), with a console line
    saying how many and, for --label_fraction, per class and a fingerprint of the chosen indices (equal
    fingerprints: the same images). Raises ValueError for a class left empty, or too few images for one batch;
    validate_common_args has refused the two flags together."""
    if args.label_fraction >= 1.0:
        return subset(train_set, args.subset_size, args.seed)
    chosen = class_balanced_subset(train_set, args.label_fraction, args.seed)
    counts = np.bincount(dataset_labels(chosen))
    counts = counts[counts > 0]
    fingerprint = hashlib.sha1(",".join(map(str, chosen.indices)).encode()).hexdigest()[:12]
    per_class = f"{counts[0]}" if counts.min() == counts.max() else f"{counts.min()} to {counts.max()}"
    print(f"--label_fraction {args.label_fraction}: training on {len(chosen)} of {len(train_set)} images, {per_class} "
          f"per class of {len(counts)} (seed {args.seed}, subset fingerprint {fingerprint})")
    if len(chosen) < args.batch_size * world_size:
        raise ValueError(f"--label_fraction {args.label_fraction} keeps {len(chosen)} training images, fewer than one "
                         f"batch of --batch_size {args.batch_size} x {world_size} processes; the last partial batch is "
                         f"dropped, so no step would run: lower --batch_size")
    return chosen


def build_vit(args, num_classes: int, **kwargs) -> nn.Module:
    """The downstream ViT, with the encoder of `--finetune` loaded (position table resized if needed)."""
    model = create_model(args.model, num_classes=num_classes, global_pool=args.global_pool,
                         img_size=args.input_size, **kwargs)
    if args.finetune:
        missing = load_pretrained_encoder(model, model_state_from(load_checkpoint(args.finetune)))
        print(f"loaded the encoder of {args.finetune}; newly initialised: {missing}")
    return model


def model_to_price(args) -> nn.Module:
    """The downstream model of `args`, built without reading the --finetune checkpoint, which a dry run may not
    have at hand (the weights change no FLOP or byte)."""
    return build_vit(argparse.Namespace(**{**vars(args), "finetune": ""}), args.nb_classes or 1000)


def classifier_dry_run(args, world_size: int, gpus: list[GpuType], kind: str) -> str:
    """`--dry_run`'s report for fine-tuning or probing (util/dry_run.py)."""
    return dry_run_report(args, world_size, gpus, model_to_price(args), kind)


def fit(args, info: DistInfo, device: torch.device, model: nn.Module, optimizer: torch.optim.Optimizer,
        criterion: nn.Module, train_loader, val_loader, mixup_fn: Optional[Callable] = None,
        fixed_record: Optional[dict] = None) -> dict:
    """Resume if possible, then train, evaluating every --eval_freq epochs and after the last; returns the last
    log record. `fixed_record` (measures taken once, before training) joins every record."""
    scaler = grad_scaler_for(device, args.amp)  # args.amp as resolved by the script
    start_epoch = 0
    run_state = RunState(args, model, optimizer, scaler)
    try:
        resume = load_resume_checkpoint(args)  # rank 0's choice, read by every rank
        if resume is not None:
            start_epoch = run_state.restore(resume[1], resume[0], weights_only=args.eval)
    except ValueError as err:  # pickled code, a corrupt file, or another model's weights
        raise SystemExit(f"error: {err}") from err
    if resume is not None:
        if not args.eval:
            truncate_log(args.output_dir, start_epoch)
        print(f"resumed from {resume[0]}")
    train_model = model
    if info.distributed:
        train_model = data_parallel(model, device)
    if args.eval:
        return evaluate(model, val_loader, device, args.amp)

    log_writer = SummaryWriter(args.log_dir or args.output_dir) if is_main_process() and args.output_dir else None
    best_acc1, record = 0.0, {}
    start_time = time.time()
    for epoch in range(start_epoch, args.epochs):
        train_loader.sampler.set_epoch(epoch)
        if hasattr(train_loader.dataset, "set_epoch"):
            train_loader.dataset.set_epoch(epoch)
        seed_everything(args.seed + epoch + 1000 * info.rank)  # drop path and mixup: per epoch, per rank
        train_stats = train_one_epoch(train_model, criterion, train_loader, optimizer, device, epoch, scaler, args,
                                      mixup_fn, log_writer)
        test_stats = {}
        if (epoch + 1) % args.eval_freq == 0 or epoch + 1 == args.epochs:
            test_stats = evaluate(model, val_loader, device, args.amp)
            best_acc1 = max(best_acc1, test_stats["acc1"])
            print(f"accuracy of the network on the val images: {test_stats['acc1']:.2f}% (best {best_acc1:.2f}%)")
        record = {"epoch": epoch, "train_images": len(train_loader.dataset),  # the images trained on, all ranks
                  **{f"train_{k}": v for k, v in train_stats.items()}, **{f"test_{k}": v for k, v in test_stats.items()},
                  **(fixed_record or {})}
        if log_writer is not None:
            for name in test_stats.keys() & {"acc1", "acc5", "loss"}:
                log_writer.add_scalar(f"perf/test_{name}", test_stats[name], epoch)
            log_writer.flush()
        append_log(args.output_dir, record)  # before the checkpoint: see main_pretrain.py
        if args.output_dir and is_main_process():
            run_state.save(epoch)
    total = time.time() - start_time
    print(f"training time {int(total // 3600)}:{int(total // 60 % 60):02d}:{int(total % 60):02d}")
    return record
