"""End-to-end fine-tuning of a pre-trained encoder (MAE's recipe: layer-wise lr decay, drop path, RandAug,
mixup/cutmix, label smoothing).

    python main_finetune.py --model vit_base_patch16 --finetune mae_pretrain_vit_base.pth --data_path /data/imagenet \
        --batch_size 32 --accum_iter 4 --blr 5e-4 --layer_decay 0.65 --drop_path 0.1 --reprob 0.25 --mixup 0.8 --cutmix 1.0
"""
import argparse

import torch
from timm.data import Mixup
from timm.layers import trunc_normal_
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from models_vit import batchnorm_head
from util.config import bool_flag, parse_with_config
from engine_finetune import add_common_args, build_vit, classifier_dry_run, fit, training_images, validate_common_args
from util.datasets import SeededDataset, build_dataset, build_transform
from util.dist import DistInfo, cleanup, init_distributed, stop_together
from util.dry_run import GpuType, gpu_types, world_size_of
from util.lr_decay import param_groups_lrd
from util.run import make_loader, start_run


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Fine-tuning for image classification",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(parser, batch_size=64, epochs=50, blr=1e-3, weight_decay=0.05, warmup_epochs=5, global_pool=True)
    parser.set_defaults(min_lr=1e-6)
    group = parser.add_argument_group("fine-tuning")
    group.add_argument("--layer_decay", default=0.75, type=float, help="lr scale per layer from the top: 0.65 for ViT-B, 0.75 for L/H")
    group.add_argument("--drop_path", default=0.1, type=float, help="stochastic depth: 0.1 (B), 0.2 (L), 0.3 (H), MAE's 100-epoch values. "
                       "A short fine-tune cannot adapt to it: 0.1 took a 94-step FT1%% run of MAE on Fashion-MNIST "
                       "from 47%% to 33%%, so use 0 there")
    group.add_argument("--crop_scale", default=(0.08, 1.0), type=float, nargs=2, metavar=("MIN", "MAX"),
                       help="random resized crop's area range (timm's and MAE's 0.08 1): on 32-px images a crop of 8%% "
                            "keeps about 9 x 9 pixels; a schedule of ~100 steps learns there only from 0.5 1 or so")
    group.add_argument("--head_batchnorm", default=False, type=bool_flag,
                       help="put the linear probe's BatchNorm (no affine) in front of the classifier. Global pooling "
                            "normalises each image's features with a fresh LayerNorm, which keeps a large per-feature "
                            "offset of the pre-trained features: after 3 epochs of MAE on Fashion-MNIST the pooled "
                            "features' means are ~9 times their spread, and a 94-step FT1%% run (--drop_path 0) "
                            "reaches 27%% behind that LayerNorm, 47%% behind BatchNorm. A long schedule re-learns the "
                            "features; a short one (low-shot, or a CPU study) needs this. Off: MAE's recipe")
    group.add_argument("--color_jitter", default=None, type=float, help="color jitter (ignored when RandAug is on)")
    group.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="timm auto-augment policy; '' for none")
    group.add_argument("--smoothing", default=0.1, type=float, help="label smoothing (without mixup)")
    group.add_argument("--reprob", default=0.25, type=float, help="random erasing probability")
    group.add_argument("--remode", default="pixel", help="random erasing mode")
    group.add_argument("--recount", default=1, type=int, help="random erasing count")
    group.add_argument("--mixup", default=0.0, type=float, help="mixup alpha (> 0 enables)")
    group.add_argument("--cutmix", default=0.0, type=float, help="cutmix alpha (> 0 enables)")
    group.add_argument("--cutmix_minmax", default=None, type=float, nargs=2, help="cutmix min/max ratio (overrides alpha)")
    group.add_argument("--mixup_prob", default=1.0, type=float, help="probability of mixup or cutmix per batch")
    group.add_argument("--mixup_switch_prob", default=0.5, type=float, help="probability of cutmix when both are on")
    group.add_argument("--mixup_mode", default="batch", choices=["batch", "pair", "elem"], help="mix per batch, per pair or per element")
    return parser


def validate_args(args, parser: argparse.ArgumentParser) -> None:
    """Fail before any work on flags that cannot run."""
    validate_common_args(args, parser)
    if args.model == "pixels":
        parser.error("--model pixels is the raw-pixel floor of linear probing (main_linprobe.py): nothing to fine-tune")
    low, high = args.crop_scale
    if not 0.0 < low <= high <= 1.0:
        parser.error(f"--crop_scale {low:g} {high:g}: the crop's area range must satisfy 0 < MIN <= MAX <= 1")
    if (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None) and args.batch_size % 2:
        parser.error(f"--mixup/--cutmix mix each image with its mirror in the batch, so --batch_size must be even, "
                     f"got {args.batch_size}")


def main(args) -> None:
    """An error on one rank stops every rank (util.dist.stop_together). With --dry_run, prints the resolved run
    instead."""
    if args.dry_run:
        print(dry_run(args, world_size_of(args), gpu_types(args.dry_run_gpu)))
        return
    info, device = init_distributed(args.device, args.dist_timeout)
    with stop_together():
        finetune(args, info, device)


def dry_run(args, world_size: int, gpus: list[GpuType]) -> str:
    """What `--dry_run` prints for this world size and these GPU types (util/dry_run.py)."""
    return classifier_dry_run(args, world_size, gpus, "finetune")


def finetune(args, info: DistInfo, device: torch.device) -> None:
    device = start_run(args, info, device)

    try:
        train_set = build_dataset(args.dataset, args.data_path, "train", build_transform(True, args.input_size, "finetune", args))
        train_set = training_images(train_set, args, info.world_size)
        val_set = build_dataset(args.dataset, args.data_path, "val", build_transform(False, args.input_size, "finetune", args))
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    num_classes = args.nb_classes or train_set.num_classes
    if num_classes == 0:
        raise SystemExit("error: fine-tuning needs labels, but --data_path has no class folders")
    train_loader = make_loader(SeededDataset(train_set, args.seed), info, args, train=True)
    val_loader = make_loader(val_set, info, args, train=False)

    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=num_classes)

    model = build_vit(args, num_classes, drop_path_rate=args.drop_path)
    trunc_normal_(model.head.weight, std=2e-5)  # MAE: a near-zero head keeps the first steps from wrecking features
    if args.head_batchnorm:
        model.head = batchnorm_head(model.head)
    model.to(device)
    optimizer = torch.optim.AdamW(param_groups_lrd(model, args.weight_decay, args.layer_decay), lr=args.lr, fused=True)
    if mixup_fn is not None:
        criterion = SoftTargetCrossEntropy()  # mixup already smooths the labels
    elif args.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()
    fit(args, info, device, model, optimizer, criterion, train_loader, val_loader, mixup_fn)
    cleanup()


if __name__ == "__main__":
    parser = get_args_parser()
    args = parse_with_config(parser)
    validate_args(args, parser)
    main(args)
