"""Linear probing (MAE's protocol): a frozen encoder, BatchNorm without affine + a linear head, LARS.

    python main_linprobe.py --model vit_base_patch16 --cls_token --finetune mae_pretrain_vit_base.pth \
        --data_path /data/imagenet --batch_size 512 --accum_iter 4 --blr 0.1 --epochs 90

With --cached_features the frozen encoder runs once over un-augmented images and the head is trained on
the stored features: orders of magnitude cheaper (the CPU demo uses it), at the cost of MAE's crop
augmentation during probing.
"""
import argparse

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.optim import Lars
from torch.utils.data import TensorDataset

from engine_finetune import add_common_args, build_vit, classifier_dry_run, fit, training_images, validate_common_args
from models_vit import batchnorm_head
from util.config import bool_flag, parse_with_config
from util.datasets import SeededDataset, build_dataset, build_transform
from util.dist import DistInfo, cleanup, gather_shards, init_distributed, stop_together
from util.dry_run import GpuType, gpu_types, world_size_of
from util.knn import knn_classify
from util.precision import autocast_for
from util.run import make_loader, start_run


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Linear probing for image classification",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(parser, batch_size=512, epochs=90, blr=0.1, weight_decay=0.0, warmup_epochs=10, global_pool=False)
    group = parser.add_argument_group("probing")
    group.add_argument("--cached_features", default=False, type=bool_flag,
                       help="extract frozen features once (no augmentation) and train the head on them")
    group.add_argument("--knn_k", default=20, type=int,
                       help="with --cached_features: also the weighted k-NN top-1 (DINO's, T 0.07) of the val features "
                            "against the training features, logged as test_knn_acc1 (0: off); label-free features "
                            "judged without a trained head, on the probe's own images")
    return parser


def build_lars(head: nn.Module, args) -> torch.optim.Optimizer:
    """MAE's LARS: trust ratio and weight decay on weight matrices only, none on biases."""
    matrices = [p for p in head.parameters() if p.requires_grad and p.ndim > 1]
    vectors = [p for p in head.parameters() if p.requires_grad and p.ndim <= 1]
    return Lars([{"params": matrices, "weight_decay": args.weight_decay, "always_adapt": True},
                 {"params": vectors, "weight_decay": 0.0, "always_adapt": False}],
                lr=args.lr, momentum=0.9)


@torch.no_grad()
def encode_dataset(encoder: nn.Module, loader, device: torch.device, amp: str) -> TensorDataset:
    """Pre-logit features (the head's input) of every image of the loader's data set, with labels, on the CPU.
    Each rank encodes its shard; every rank gets the whole set back, so that the loaders built on the features
    shard it once (not a shard of a shard) and the k-NN sees every image."""
    encoder.eval()
    features, labels = [], []
    for images, targets in loader:
        with autocast_for(device, amp):
            tokens = encoder.forward_features(images.to(device, non_blocking=True))
            features.append(encoder.forward_head(tokens, pre_logits=True).float().cpu())
        labels.append(targets)
    total = len(loader.dataset)
    return TensorDataset(gather_shards(torch.cat(features), total), gather_shards(torch.cat(labels), total))


def main(args) -> None:
    """An error on one rank stops every rank (util.dist.stop_together). With --dry_run, prints the resolved run
    instead."""
    if args.dry_run:
        print(dry_run(args, world_size_of(args), gpu_types(args.dry_run_gpu)))
        return
    info, device = init_distributed(args.device, args.dist_timeout)
    with stop_together():
        linear_probe(args, info, device)


def dry_run(args, world_size: int, gpus: list[GpuType]) -> str:
    """What `--dry_run` prints for this world size and these GPU types (util/dry_run.py)."""
    return classifier_dry_run(args, world_size, gpus, "linprobe")


def linear_probe(args, info: DistInfo, device: torch.device) -> None:
    device = start_run(args, info, device)

    kind = "finetune" if args.cached_features else "linprobe"  # cached: features of un-augmented images
    try:
        train_set = build_dataset(args.dataset, args.data_path, "train", build_transform(not args.cached_features, args.input_size, kind))
        train_set = training_images(train_set, args, info.world_size)
        val_set = build_dataset(args.dataset, args.data_path, "val", build_transform(False, args.input_size, "linprobe"))
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    num_classes = args.nb_classes or train_set.num_classes
    if num_classes == 0:
        raise SystemExit("error: linear probing needs labels, but --data_path has no class folders")

    model = build_vit(args, num_classes)
    trunc_normal_(model.head.weight, std=0.01)
    head = batchnorm_head(model.head)  # the BatchNorm has no parameters: the probe is still linear
    for param in model.parameters():
        param.requires_grad = False
    for param in head.parameters():
        param.requires_grad = True
    model.to(device)

    if args.cached_features:
        encode_args = argparse.Namespace(**{**vars(args), "batch_size": max(args.batch_size, 256)})
        train_feats = encode_dataset(model, make_loader(train_set, info, encode_args, train=False), device, args.amp)
        val_feats = encode_dataset(model, make_loader(val_set, info, encode_args, train=False), device, args.amp)
        probe_model = head.to(device)
        train_loader = make_loader(SeededDataset(train_feats, args.seed), info, argparse.Namespace(**{**vars(args), "num_workers": 0}), train=True)
        val_loader = make_loader(val_feats, info, argparse.Namespace(**{**vars(args), "num_workers": 0}), train=False)
    else:
        model.head = head
        probe_model = model
        train_loader = make_loader(SeededDataset(train_set, args.seed), info, args, train=True)
        val_loader = make_loader(val_set, info, args, train=False)
    print(f"trainable parameters: {sum(p.numel() for p in probe_model.parameters() if p.requires_grad)}")

    fixed_record = {}
    if args.cached_features and args.knn_k > 0:
        train_x, train_y = train_feats.tensors
        val_x, val_y = val_feats.tensors
        predicted = knn_classify(train_x, train_y, val_x, args.knn_k, num_classes=num_classes)
        fixed_record["test_knn_acc1"] = (predicted == val_y).float().mean().item() * 100
        print(f"k-NN top-1 (k={args.knn_k}) of the frozen features: {fixed_record['test_knn_acc1']:.2f}%")
    optimizer = build_lars(head, args)
    record = fit(args, info, device, probe_model, optimizer, nn.CrossEntropyLoss(), train_loader, val_loader,
                 fixed_record=fixed_record)
    if record:
        print(f"linear probe: top-1 {record.get('test_acc1', float('nan')):.2f}%  top-5 {record.get('test_acc5', float('nan')):.2f}%")
    cleanup()


if __name__ == "__main__":
    parser = get_args_parser()
    args = parse_with_config(parser)
    validate_common_args(args, parser)
    if args.knn_k < 0:
        parser.error(f"--knn_k must be >= 0 (neighbours voting; 0: no k-NN), got {args.knn_k}")
    main(args)
