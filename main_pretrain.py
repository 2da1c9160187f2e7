"""Pre-training (MAE and the methods built on it) with the one engine.

    python main_pretrain.py --config configs/mae/vit_base_in1k_800ep.yaml --data_path /data/imagenet
    torchrun --nproc_per_node 8 main_pretrain.py --model mae_vit_base_patch16 --norm_pix_loss ...
"""
import argparse
import time
import warnings
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import save_image

from engine_pretrain import (
    PretrainTask,
    build_optimizer,
    check_one_batch_fits,
    check_pretrain_model,
    compile_model,
    set_fused_attn,
    train_one_epoch,
)
from util.batch import add_batch_args
from util.checkpoint import LAST, RunState, load_resume_checkpoint
from util.config import bool_flag, parse_with_config
from util.datasets import DATASETS, SeededDataset, SkipBadImages, TrainData, build_dataset, build_transform, subset
from util.dist import (
    DistInfo,
    all_gather_object,
    all_reduce_sum,
    cleanup,
    data_parallel,
    init_distributed,
    is_main_process,
    stop_together,
)
from util.dry_run import GpuType, add_dry_run_args, dry_run_report, gpu_types, world_size_of
from util.knn import extract_features, knn_classify
from util.memory import count_step_memory, memory_warning
from util.metrics import NonFiniteStepSkipper
from util.precision import AMP_DTYPES, add_precision_args, autocast_for, grad_scaler_for
from util.preempt import SAVE_EVERY_MINUTES, MidEpoch, Preempted, SaveTrigger
from util.registry import add_method_args, create_model, method_for, other_methods_flags, pretrain_models
from util.run import (
    append_log,
    default_workers,
    make_loader,
    seed_everything,
    start_run,
    truncate_log,
)
from util.visualize import reconstruction_grid


def open_unit_interval(value: str) -> float:
    ratio = float(value)
    if not 0.0 < ratio < 1.0:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {value}")
    return ratio


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Masked image modeling pre-training", add_help=True,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default="", help="YAML file whose keys set these flags' defaults; the command line overrides it")
    group = parser.add_argument_group("optimisation")
    add_batch_args(group, 64, "images per process per step (with --effective_batch: the most, what fits in memory); "
                              "effective batch = batch_size x accum_iter x processes")
    group.add_argument("--epochs", default=400, type=int, help="pre-training epochs (MAE: 800; released weights 1600)")
    group.add_argument("--weight_decay", default=0.05, type=float, help="AdamW weight decay (not on biases and norm weights)")
    group.add_argument("--lr", default=None, type=float, help="absolute lr; default blr x effective batch / 256")
    group.add_argument("--blr", default=1e-3, type=float, help="base lr per 256 images; MAE's recipe is 1.5e-4 at batch 4096")
    group.add_argument("--min_lr", default=0.0, type=float, help="floor of the cosine schedule")
    group.add_argument("--warmup_epochs", default=40, type=int, help="linear warm-up epochs (fractional per step)")
    group.add_argument("--clip_grad", default=None, type=float,
                       help="clip the global gradient norm of what the loss trains (encoder, decoder, the method's heads) to this; "
                            "off by default, as MAE. The online probe is left out (a passive monitor must not change the "
                            "encoder's steps), and so is MI-MAE's V, in its main and --v_steps updates (an estimator: its NLL "
                            "gradient must not set the encoder's clipping factor)")
    add_precision_args(group)  # --amp, --tf32

    group = parser.add_argument_group("model")
    group.add_argument("--model", default="mae_vit_large_patch16", help=f"pre-training model; one of {pretrain_models()}")
    group.add_argument("--input_size", default=224, type=int, help="image side in pixels; must be divisible by the patch size")
    group.add_argument("--mask_ratio", default=0.75, type=open_unit_interval, help="fraction of patches removed")
    group.add_argument("--norm_pix_loss", action="store_true", help="normalise each target patch by its mean and std (MAE's recipe; better features)")
    parser.set_defaults(norm_pix_loss=False)
    group.add_argument("--compile", default=False, type=bool_flag,
                       help="torch.compile the model: fuses elementwise ops into fewer kernels (0-10%% faster steps on a CPU, more where "
                            "kernel launches dominate, as on GPUs; minutes of compilation first); runs eagerly, with a warning, where unsupported")
    group.add_argument("--fused_attn", default=True, type=bool_flag,
                       help="attention through F.scaled_dot_product_attention (timm's default: flash kernels, keep it on a GPU); "
                            "false: explicit matmul-softmax-matmul, which --compile fuses into its kernels: 2-5%% faster than --compile alone "
                            "for vit_tiny_patch4 on a 2-core CPU (docs/PERFORMANCE.md); same results up to rounding")
    group.add_argument("--grad_checkpointing", default=False, type=bool_flag,
                       help="recompute each encoder and decoder block's activations in the backward: far less activation memory "
                            "(larger batches or models per GPU) for 15-20%% more step time; same gradients")

    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default="imagefolder", choices=DATASETS,
                       help="imagefolder: train/ class folders, or any folder of unlabelled images; fashion_mnist: IDX .gz files; cifar10/100: torchvision's files (never downloaded); tiny_imagenet: the official tiny-imagenet-200 folder")
    group.add_argument("--data_path", default="", help="dataset folder")
    group.add_argument("--subset_size", default=0, type=int, help="train on a fixed random subset of this many images (0: all); for quick runs")
    group.add_argument("--num_workers", default=default_workers(), type=int, help="data-loading processes per GPU/process")
    group.add_argument("--pin_mem", default=True, type=bool_flag, help="pin host memory for faster GPU copies")
    group.add_argument("--data_pipeline", default="fast", choices=("fast", "pil"),
                       help="MAE's augmentation (random resized crop, scale 0.2-1, bicubic, and flip) as: fast, image files "
                            "decoded by libjpeg-turbo through torchvision.io and resized by torch's antialiased bicubic on "
                            "uint8 (PIL's kernel), uint8 batches normalised on the device: the same box and flip draws, "
                            "pixels within 16 levels of pil (99.9%% within 2, PSNR >= 50 dB), several times its images/s per worker "
                            "(docs/PERFORMANCE.md); pil: MAE's PIL transform with ToTensor and Normalize in the workers. "
                            "CMAE's two ContrastiveCrop views and the in-memory sets (fashion_mnist, cifar10/100) always take the PIL path")
    group.add_argument("--skip_bad_images", default=False, type=bool_flag,
                       help="replace each corrupt, truncated or empty image file by the next readable sample (the epoch keeps "
                            "its length; each file is reported once, log.txt counts replacements as bad_images_replaced); "
                            "off: the first read of such a file stops the run naming it")

    group = parser.add_argument_group("monitoring")
    group.add_argument("--online_probe", default=False, type=bool_flag,
                       help="train a linear classifier (BatchNorm + Linear) on the detached cls features alongside; needs labels")
    group.add_argument("--knn_freq", default=0, type=int, help="every N epochs, k-NN accuracy of the cls features on the val split (0: off; needs labels)")
    group.add_argument("--knn_k", default=20, type=int, help="neighbours voting in the k-NN monitor")
    group.add_argument("--knn_max_train", default=10000, type=int, help="train images used as the k-NN memory bank")
    group.add_argument("--vis_freq", default=20, type=int, help="every N epochs, save a grid of reconstructions (0: off)")
    group.add_argument("--print_freq", default=20, type=int, help="steps between console lines; also the only host syncs inside an epoch")

    group = parser.add_argument_group("run")
    group.add_argument("--output_dir", default="./output_dir", help="checkpoints, log.txt, args.yaml and reconstructions")
    group.add_argument("--log_dir", default=None, help="TensorBoard folder (default: output_dir)")
    group.add_argument("--device", default="cuda", help="cuda or cpu; falls back to the CPU when no GPU is present")
    group.add_argument("--seed", default=0, type=int, help="seed of weights, data order, augmentation and masks (each sample's randomness depends on seed, epoch and index only)")
    group.add_argument("--resume", default="", help="checkpoint to resume from (default: output_dir/checkpoint-last.pth if present)")
    group.add_argument("--auto_resume", default=True, type=bool_flag, help="resume from output_dir/checkpoint-last.pth when it exists")
    group.add_argument("--save_freq", default=20, type=int, help="keep checkpoint-<epoch>.pth every N epochs (checkpoint-last.pth is written every epoch)")
    group.add_argument("--save_every_minutes", default=SAVE_EVERY_MINUTES, type=float,
                       help="also write checkpoint-last.pth inside an epoch every N minutes (rank 0's clock), and always "
                            "on SIGTERM or SLURM's pre-emption signal (then stop): a restart continues from that step with "
                            "the data, masks and random state it would have had. What a hard kill loses is at most this "
                            "interval. A ViT-B save took 6-8 s and a ViT-L one 28 s on a 0.15 GB/s disk (docs/RELIABILITY.md): keep the interval above 100 saves' time. 0: only on the signals")
    group.add_argument("--dist_timeout", default=1800, type=int, help="seconds before a collective waiting on a dead rank fails")
    group.add_argument("--nan_policy", default="stop", choices=("stop", "skip"),
                       help="on a NaN/inf loss or term: stop (checked at --print_freq, naming the term and step; no per-step "
                            "sync), or skip that optimizer step and go on (one host sync per step)")
    group.add_argument("--max_nan_skips", default=20, type=int,
                       help="with --nan_policy skip: skipped steps allowed in the whole run (counted across resumes; log.txt "
                            "has train_nan_skips per epoch); one more stops it, as a diverging run would only waste compute")
    add_dry_run_args(parser)
    add_method_args(parser)
    return parser


def validate_args(args, parser: argparse.ArgumentParser) -> None:
    """Fail before any work on flags that cannot run."""
    if args.model not in pretrain_models():
        parser.error(f"--model: unknown model {args.model!r}; choose one of {pretrain_models()}")
    method = method_for(args.model)
    if method.validate is not None:
        try:
            method.validate(args)
        except ValueError as err:
            parser.error(str(err))
    if args.batch_size < 1 or (args.accum_iter is not None and args.accum_iter < 1) or args.effective_batch < 0:
        parser.error("--batch_size and --accum_iter must be positive, --effective_batch non-negative")
    if args.online_probe and args.batch_size < 2:
        parser.error("--online_probe trains a BatchNorm, which needs --batch_size of at least 2 per process")
    if args.max_nan_skips < 0:
        parser.error(f"--max_nan_skips must be non-negative, got {args.max_nan_skips}")
    if args.epochs < 1 or args.warmup_epochs < 0:
        parser.error("--epochs must be positive and --warmup_epochs non-negative")
    if args.dry_run:  # prices a run before its data is at hand
        return
    if not args.data_path:
        parser.error("--data_path is required")
    if not Path(args.data_path).exists():
        parser.error(f"--data_path: no such folder: {args.data_path}")
    if args.resume and not Path(args.resume).is_file():
        parser.error(f"--resume: no such file: {args.resume}")


def check_resumable(checkpoint: dict, args, path: Path) -> None:
    """Refuse, naming the flags, to resume a checkpoint trained with other model or method flags: --model,
    --online_probe, and every flag that reaches the model's constructor through the method's model_kwargs
    (input size, mask ratio, norm_pix_loss, each method's own flags). Schedule and data flags may change."""
    saved = checkpoint.get("args") or {}
    model_kwargs = method_for(args.model).model_kwargs
    current = model_kwargs(args)
    changed = []
    for flag, value in saved.items():
        now = getattr(args, flag, value)  # a flag this version no longer has cannot shape the model
        if now == value:
            continue
        if flag in ("model", "online_probe") or model_kwargs(argparse.Namespace(**{**vars(args), flag: value})) != current:
            changed.append(f"--{flag} {value} (this run: {now})")
    if changed:
        raise SystemExit(f"error: cannot resume from {path}: it was trained with {', '.join(changed)}; "
                         f"rerun with the checkpoint's flags, or use another --output_dir")


def main(args) -> torch.nn.Module:
    """Pre-train as `args` say; returns the trained model (every rank holds the same weights). An error on one rank
    stops every rank (util.dist.stop_together). With --dry_run, prints the resolved run instead and returns None."""
    if getattr(args, "dry_run", False):
        print(dry_run(args, world_size_of(args), gpu_types(args.dry_run_gpu)))
        return None
    info, device = init_distributed(args.device, args.dist_timeout)
    with stop_together():
        try:
            return pretrain(args, info, device)
        except Preempted as stop:  # every rank saved at the same step; the same command resumes there
            print(f"[rank {info.rank}] {stop}; the same command resumes there", flush=True)
            raise


def whole_batch_of(args) -> str | None:
    """Why the method needs each optimizer step to be one forward (util.spec.Method.whole_batch), or None."""
    method = method_for(args.model)
    return method.whole_batch(args) if method.whole_batch is not None else None


def build_model(args) -> torch.nn.Module:
    try:
        return create_model(args.model, **method_for(args.model).model_kwargs(args))
    except ValueError as err:  # e.g. an input size the patch size does not divide
        raise SystemExit(f"error: --model {args.model} with --input_size {args.input_size}: {err}") from err


def dry_run(args, world_size: int, gpus: list[GpuType]) -> str:
    """What `--dry_run` prints for this world size and these GPU types (util/dry_run.py)."""
    return dry_run_report(args, world_size, gpus, build_model(args), "pretrain", whole_batch_of(args))


def pretrain(args, info: DistInfo, device: torch.device) -> torch.nn.Module:
    whole_batch = whole_batch_of(args)
    for flag in other_methods_flags(args.model):  # args.yaml and checkpoints hold what this run reads
        delattr(args, flag)
    device = start_run(args, info, device, whole_batch)

    model = build_model(args)
    check_pretrain_model(model, args.model)
    try:
        # the method's samples (MAE: one augmented view) and between-epoch work (CMAE: ContrastiveCrop's boxes)
        train_data = (method_for(args.model).train_data or TrainData)(args)
        dataset = build_dataset(args.dataset, args.data_path, "train", train_data.image_transform())
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    num_classes = dataset.num_classes
    if (args.online_probe or args.knn_freq) and num_classes == 0:
        raise SystemExit("error: --online_probe and --knn_freq need labels, but the data at --data_path has no class folders")
    def readable(images):  # --skip_bad_images: every set this run reads replaces unreadable files
        return SkipBadImages(images) if args.skip_bad_images else images

    train_images = readable(subset(dataset, args.subset_size, args.seed))
    train_set = SeededDataset(train_data.wrap(train_images), args.seed, noise_size=model.noise_per_sample)
    check_one_batch_fits(len(train_set), args.batch_size, info.world_size)
    loader = make_loader(train_set, info, args, train=True)

    task = PretrainTask(model, num_classes if args.online_probe else 0).to(device)
    if device.type == "cuda":  # say before the first step if it will not fit, and what would
        memory = count_step_memory(model, args.input_size, AMP_DTYPES.get(args.amp))
        capacity = torch.cuda.get_device_properties(device).total_memory
        if warning := memory_warning(memory, args.batch_size, args.grad_checkpointing, capacity):
            warnings.warn(warning, stacklevel=1)
    set_fused_attn(model, args.fused_attn)
    if args.grad_checkpointing:
        model.set_grad_checkpointing()
    if args.compile:
        compile_model(model)
    optimizer = build_optimizer(task, args)
    scaler = grad_scaler_for(device, args.amp)
    print(f"model {args.model}: {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M trainable parameters")

    start_epoch, mid_epoch = 0, None
    nan_skips = NonFiniteStepSkipper(args.max_nan_skips) if args.nan_policy == "skip" else None
    run_state = RunState(args, model, optimizer, scaler, task.probe, train_data, nan_skips)
    try:
        resume = load_resume_checkpoint(args)  # rank 0's choice, read by every rank
        if resume is not None:
            resume_path, checkpoint = resume
            check_resumable(checkpoint, args, resume_path)
            start_epoch = run_state.restore(checkpoint, resume_path)
            mid_epoch = mid_epoch_of(checkpoint, resume_path, info)
    except ValueError as err:  # pickled code, a corrupt file, or another model's weights
        raise SystemExit(f"error: {err}") from err
    if resume is not None:
        where = f"inside epoch {start_epoch} after step {mid_epoch.step}" if mid_epoch else f"epoch {checkpoint['epoch']} done"
        print(f"resumed from {resume_path} ({where})")
    truncate_log(args.output_dir, start_epoch)  # also on a fresh start: lines of a run killed before its first checkpoint

    train_task = task
    if info.distributed:
        train_task = data_parallel(task, device)

    log_writer = SummaryWriter(args.log_dir or args.output_dir) if is_main_process() and args.output_dir else None
    vis_images = knn_loaders = None
    eval_transform = build_transform(False, args.input_size, "finetune")
    if args.vis_freq > 0 and args.output_dir and is_main_process():
        eval_set = readable(build_dataset(args.dataset, args.data_path, "train", eval_transform))
        vis_images = torch.stack([eval_set[i][0] for i in range(min(8, len(eval_set)))]).to(device)
    if args.knn_freq > 0:
        bank = subset(build_dataset(args.dataset, args.data_path, "train", eval_transform), args.knn_max_train, args.seed)
        query = build_dataset(args.dataset, args.data_path, "val", eval_transform)
        # each rank encodes its shard; extract_features gathers the features
        knn_loaders = [make_loader(readable(d), info, args, train=False) for d in (bank, query)]

    print(f"start training for {args.epochs - start_epoch} epochs from epoch {start_epoch}")
    start_time = time.time()
    # pre-emption signals and the --save_every_minutes clock ask for a checkpoint inside the epoch (util.preempt)
    trigger = SaveTrigger(args.save_every_minutes, is_main_process())
    trigger.install()
    try:
        for epoch in range(start_epoch, args.epochs):
            resumed, mid_epoch = mid_epoch, None  # only the first epoch of a resumed run starts inside
            loader.sampler.set_epoch(epoch, skip=resumed.step * args.batch_size if resumed else 0)
            train_set.set_epoch(epoch)
            train_data.start_epoch(epoch)
            # main-process randomness (--club_sampled) depends on the epoch and rank only: exact resume, and each
            # rank draws its own numbers
            seed_everything(args.seed + epoch + 1000 * info.rank)
            epoch_start = time.time() - (resumed.elapsed_s if resumed else 0.0)

            def save_mid_epoch(state: MidEpoch, epoch: int = epoch) -> None:
                ranks = all_gather_object(state.to_dict())  # each rank's random state and sums, to rank 0
                if args.output_dir and is_main_process():
                    run_state.save_mid_epoch(epoch, ranks)
                    print(f"saved {Path(args.output_dir) / LAST} inside epoch {epoch} after step {state.step}", flush=True)

            train_stats = train_one_epoch(train_task, loader, optimizer, device, epoch, scaler, args, log_writer, nan_skips,
                                          trigger, save_mid_epoch, resumed)
            record = {"epoch": epoch, **{f"train_{k}": v for k, v in train_stats.items()}}
            if resumed:
                record["resumed_at_step"] = resumed.step
            record.update(train_data.end_epoch(epoch, model, device, lambda: autocast_for(device, args.amp)))
            if args.skip_bad_images:  # the workers' counts are in shared memory; other ranks' come by all-reduce
                record["bad_images_replaced"] = int(all_reduce_sum(torch.tensor(train_images.new_replacements(), device=device)))
            record["epoch_time_s"] = round(time.time() - epoch_start, 2)
            # Budgets for equal-epoch and equal-compute comparisons (tools/make_tables.py).
            steps = len(loader) + (resumed.step if resumed else 0)
            record["images_seen"] = (epoch + 1) * steps * args.batch_size * info.world_size
            record["sequences_seen"] = record["images_seen"] * model.sequences_per_image

            if knn_loaders is not None and ((epoch + 1) % args.knn_freq == 0 or epoch + 1 == args.epochs):
                model.eval()
                bank_x, bank_y = extract_features(model, knn_loaders[0], device, lambda: autocast_for(device, args.amp))
                query_x, query_y = extract_features(model, knn_loaders[1], device, lambda: autocast_for(device, args.amp))
                prediction = knn_classify(bank_x, bank_y, query_x, args.knn_k, num_classes=num_classes)
                record["test_knn_acc1"] = (prediction == query_y).float().mean().item() * 100
                print(f"k-NN top-1 (k={args.knn_k}): {record['test_knn_acc1']:.2f}%")
                if log_writer is not None:
                    log_writer.add_scalar("test/knn_acc1", record["test_knn_acc1"], epoch)
            if vis_images is not None and ((epoch + 1) % args.vis_freq == 0 or epoch + 1 == args.epochs):
                noise = torch.rand(vis_images.shape[0], model.num_patches, generator=torch.Generator().manual_seed(0)).to(device)
                with autocast_for(device, args.amp):
                    grid = reconstruction_grid(model, vis_images, noise)
                save_image(grid, Path(args.output_dir) / f"reconstruction-{epoch:04d}.png")
                log_writer.add_image("reconstruction", grid, epoch)

            # Log before the checkpoint: a kill in between re-trains this epoch and resume drops the stale line,
            # while the other order could lose the line of an epoch the checkpoint already holds.
            append_log(args.output_dir, record)
            if args.output_dir and is_main_process():
                run_state.save(epoch)
            if log_writer is not None:
                log_writer.flush()
            trigger.saved()
            if trigger.stop and epoch + 1 < args.epochs:  # a signal in the epoch's last steps: saved just above
                raise Preempted(trigger.signum, f"epoch {epoch}")
    finally:
        trigger.uninstall()

    total = time.time() - start_time
    print(f"training time {int(total // 3600)}:{int(total // 60 % 60):02d}:{int(total % 60):02d}")
    if log_writer is not None:
        log_writer.close()
    cleanup()
    return model


def mid_epoch_of(checkpoint: dict, path: Path, info: DistInfo) -> MidEpoch | None:
    """This rank's state inside the epoch of a checkpoint saved there (util.preempt), or None after a finished
    epoch. Refused on another number of processes: each rank's share of the data and random state depend on it."""
    mid = checkpoint.get("mid_epoch")
    if mid is None:
        return None
    if len(mid["ranks"]) != info.world_size:
        raise SystemExit(f"error: {path} was saved inside epoch {mid['epoch']} by {len(mid['ranks'])} process(es), "
                         f"and this run has {info.world_size}: resume it on {len(mid['ranks'])}, as each process's "
                         f"share of the epoch's data and its random state depend on the count")
    return MidEpoch(**mid["ranks"][info.rank])


if __name__ == "__main__":
    parser = get_args_parser()
    args = parse_with_config(parser)
    validate_args(args, parser)
    main(args)
