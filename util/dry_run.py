"""`--dry_run`: the run a command resolves to, and what it costs, printed before any GPU time is spent.

For a world size (`--world_size`, or --nodes x --ngpus through submitit_*.py) and a GPU type, it prints the batch
plan (util.batch), the lr, the precision `--amp` resolves to on that GPU, the memory one process needs (counted by
util.memory), the FLOPs of one image's step and the GPU-hours these imply at a stated model-FLOPs utilisation (MFU).

FLOPs: torch.utils.flop_counter counts the forward of the run's own model on the CPU (matrix products and
attention, whose CPU kernel is given the GPU kernel's formula; elementwise work is not counted; a ViT's count
equals the closed form, tests/test_batch.py), and a training step is 3 forwards (the backward computes two products
for each product of the forward). MFU: calibrated per kind of run on the times MAE publishes for its own code on
V100s (PRETRAIN.md, FINETUNE.md): FLOPs of the run / (GPUs x hours x 125 TFLOP/s, the V100's fp16 peak):
- pre-training, ViT-L 800 epochs, ~42 h on 64 V100s: 3 x 41.51 GFLOP x 1,281,167 x 800 images -> 10.6%;
- fine-tuning, ViT-B 100 epochs, ~7h11m on 32 V100s (validation included) -> 13.2% (ViT-L's 50 epochs, ~8h52m,
  imply 18.8%: the estimate is 1.4x too high for ViT-L fine-tuning);
- linear probing, ViT-B 90 epochs, ~2h20m on 32 V100s -> 12.5%.
The A100 and H100 are assumed to reach the same fractions of their peaks. Every GPU-hour figure is an estimate
until a run on that GPU measures it.
"""
import argparse
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch.utils import flop_counter

from util.batch import BatchPlan, effective_lr, plan_batch
from util.cuda_build import parse_gpu, sm
from util.memory import StepMemory, count_step_memory
from util.precision import amp_for_gpu

MFU = {"pretrain": 0.106, "finetune": 0.132, "linprobe": 0.125}  # the official MAE code's on V100s (module docstring)
DATASET_IMAGES = {"imagefolder": 1_281_167, "fashion_mnist": 60_000, "cifar10": 50_000, "cifar100": 50_000,
                  "tiny_imagenet": 100_000}  # training images of one epoch; imagefolder: ImageNet-1k's train split
DATASET_VAL_IMAGES = {"imagefolder": 50_000, "fashion_mnist": 10_000, "cifar10": 10_000, "cifar100": 10_000,
                      "tiny_imagenet": 10_000}
DRY_RUN_FLAGS = ("dry_run", "world_size", "dry_run_gpu")


@dataclass(frozen=True)
class GpuType:
    name: str
    capability: tuple[int, int]
    memory_gib: float
    peak_tflops: float  # dense tensor-core peak in the precision --amp auto picks there (fp16 on V100, else bf16)


GPU_TYPES = {gpu.name: gpu for gpu in (
    GpuType("V100", (7, 0), 32, 125),  # SXM2 32 GB (volta32gb); fp16
    GpuType("A100", (8, 0), 80, 312),  # SXM 80 GB; bf16
    GpuType("H100", (9, 0), 80, 989),  # SXM 80 GB; bf16, dense
)}


def add_dry_run_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("dry run")
    group.add_argument("--dry_run", action="store_true",
                       help="print the resolved run (world size, per-GPU batch x accum, effective batch, lr, precision, "
                            "memory per GPU, FLOPs and estimated GPU-hours for the GPU type) and exit: nothing is read, "
                            "trained, written or submitted")
    group.add_argument("--world_size", default=0, type=int,
                       help="processes that --dry_run resolves for (default: $WORLD_SIZE as torchrun sets it, else 1); "
                            "submitit_*.py uses --nodes x --ngpus, and a real run its launcher's")
    group.add_argument("--dry_run_gpu", default="",
                       help="GPU type that --dry_run prices: " + ", ".join(GPU_TYPES) + " (default: submitit's "
                            "--use_volta32 means V100; else this machine's GPU; else all three)")


def drop_dry_run_args(args: argparse.Namespace) -> None:
    """A real run records none of the dry-run flags (args.yaml, checkpoints)."""
    for flag in DRY_RUN_FLAGS:
        if hasattr(args, flag):
            delattr(args, flag)


def gpu_types(requested: str) -> list[GpuType]:
    """The GPU types to price: the one asked for, else this machine's, else every type of GPU_TYPES."""
    if requested:
        try:
            capability = parse_gpu(requested)
        except ValueError as err:
            raise SystemExit(f"error: --dry_run_gpu: {str(err).split(': ', 1)[1]}") from None
        known = [gpu for gpu in GPU_TYPES.values() if gpu.capability == capability or gpu.name.lower() == requested.lower()]
        if not known:
            raise SystemExit(f"error: --dry_run_gpu {requested} ({sm(capability)}): no peak FLOP/s known for it; "
                             f"choose one of {', '.join(GPU_TYPES)}")
        return known[:1]
    if torch.cuda.is_available():
        capability = tuple(torch.cuda.get_device_capability())
        return [gpu for gpu in GPU_TYPES.values() if gpu.capability[0] == capability[0]][:1] or list(GPU_TYPES.values())
    return list(GPU_TYPES.values())


def world_size_of(args: argparse.Namespace) -> int:
    return args.world_size or int(os.environ.get("WORLD_SIZE", "1"))


def precision_on(amp: str, gpu: GpuType) -> str:
    """What --amp resolves to on `gpu` (util.precision's policy), or why it is refused."""
    if amp == "bf16" and gpu.capability[0] < 8:
        return f"refused: --amp bf16 on {gpu.name} (no bf16 tensor cores); use --amp auto (fp16 + GradScaler)"
    resolved = amp_for_gpu(gpu.capability) if amp == "auto" else amp
    return resolved + (" + GradScaler" if resolved == "fp16" else "")


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(step: Callable[[], object]) -> float:
    """FLOPs that `step` runs (matrix products and attention, as torch.utils.flop_counter counts them)."""
    # on the CPU, F.scaled_dot_product_attention runs a kernel the counter has no formula for: give it the GPU one's
    cpu_attention = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops}
    with flop_counter.FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        step()
    return float(counter.get_total_flops())


def counted_step(model: nn.Module, input_size: int, amp_dtype: Optional[torch.dtype]) -> tuple[float, StepMemory]:
    """(forward FLOPs per image, memory of a training step) from util.memory's count, whose forwards (1 and 2
    images) the FLOP counter watches. A half-precision count runs in bf16: on the CPU fp16 is many times slower,
    and both keep 2-byte activations."""
    dtype = torch.bfloat16 if amp_dtype is not None else None
    memory: list[StepMemory] = []
    flops = count_flops(lambda: memory.append(count_step_memory(model, input_size, dtype, batch_size=1)))
    return flops / 3, memory[0]


def forward_flops(model: nn.Module, input_size: int) -> float:
    """Forward FLOPs of one image through a classifier."""
    images = torch.randn(1, 3, input_size, input_size)
    with torch.no_grad():
        return count_flops(lambda: model(images))


def format_hours(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}" if value >= 0.1 else "<0.1"


@dataclass(frozen=True)
class GpuCost:
    gpu: GpuType
    precision: str  # what --amp resolves to there, or why it is refused
    memory_bytes: Optional[float]  # counted peak per process; None for the probe's frozen encoder
    gpu_hours: float

    @property
    def fits(self) -> bool:
        return self.memory_bytes is None or self.memory_bytes <= self.gpu.memory_gib * 2**30


@dataclass(frozen=True)
class Estimate:
    """What a run resolves to and costs (module docstring)."""

    kind: str  # pretrain, finetune or linprobe
    plan: BatchPlan
    lr: float
    images: int  # per epoch
    epochs: int  # epochs the FLOPs are counted over (1 for a probe on cached features)
    step_flops: float  # per image
    total_flops: float
    costs: list[GpuCost]


def estimate(args: argparse.Namespace, world_size: int, gpus: list[GpuType], model: nn.Module, kind: str,
             whole_batch: Optional[str] = None) -> Estimate:
    """The run of `args` on `world_size` processes of each GPU type, for a `kind` of run (pretrain, finetune or
    linprobe) whose model is `model`, built on the CPU. ValueError where the batch plan is refused."""
    plan = plan_batch(args.effective_batch, world_size, args.batch_size, args.accum_iter, whole_batch)
    images = args.subset_size or DATASET_IMAGES.get(args.dataset, DATASET_IMAGES["imagefolder"])
    val_images = DATASET_VAL_IMAGES.get(args.dataset, 0) if kind != "pretrain" else 0
    precisions = {gpu.name: precision_on(args.amp, gpu) for gpu in gpus}
    counts: dict[bool, tuple[float, StepMemory]] = {}
    if kind == "linprobe":  # a frozen encoder: forward only, no activations kept for a backward
        forward = step = forward_flops(model, args.input_size)
    else:
        for precision in precisions.values():  # a refused bf16 is priced as the fp16 it must become
            half = not precision.startswith("none")
            if half not in counts:
                counts[half] = counted_step(model, args.input_size, torch.bfloat16 if half else None)
        forward = next(iter(counts.values()))[0]
        step = 3 * forward  # the backward: twice the forward, as for every matrix product whose inputs both train
    epochs = args.epochs
    total = (step * images + forward * val_images / max(1, getattr(args, "eval_freq", 1))) * epochs
    if kind == "linprobe" and getattr(args, "cached_features", False):  # the encoder runs once; the head is negligible
        epochs, total = 1, forward * (images + val_images)
    checkpointing = getattr(args, "grad_checkpointing", False)
    costs = [GpuCost(gpu, precisions[gpu.name],
                     counts[not precisions[gpu.name].startswith("none")][1].peak(plan.batch_size, checkpointing) if counts else None,
                     total / (gpu.peak_tflops * 1e12 * MFU[kind]) / 3600) for gpu in gpus]
    return Estimate(kind, plan, effective_lr(args, plan), images, epochs, step, total, costs)


def plan_lines(args: argparse.Namespace, plan: BatchPlan) -> list[str]:
    lr = effective_lr(args, plan)
    rule = "--lr" if args.lr is not None else f"blr {args.blr:g} x {plan.effective} / 256"
    declared = f" (declared: --effective_batch {args.effective_batch})" if args.effective_batch else ""
    return [f"  world size       {plan.world_size} process(es)",
            f"  per-GPU batch    {plan.batch_size} images x accum_iter {plan.accum_iter}",
            f"  effective batch  {plan.effective} images per optimizer step{declared}",
            f"  micro-batch      {plan.micro_batch} images over all processes per forward (what gathered negatives, "
            f"global BatchNorm and batch regularisers see)",
            f"  lr               {lr:.3e} ({rule})"]


def cost_line(cost: GpuCost, world_size: int, mfu: float) -> str:
    memory = ""
    if cost.memory_bytes is not None:
        fits = "fits" if cost.fits else "DOES NOT FIT: lower --batch_size (accum_iter follows) or --grad_checkpointing true"
        memory = f"; memory ~{cost.memory_bytes / 2**30:.1f} of {cost.gpu.memory_gib:g} GiB per GPU ({fits})"
    return (f"  on {cost.gpu.name:<13} {cost.precision}{memory}; ~{format_hours(cost.gpu_hours)} GPU-hours = "
            f"~{format_hours(cost.gpu_hours / world_size)} h on {world_size} GPUs (estimate at MFU {mfu:.1%}, util/dry_run.py)")


def dry_run_report(args: argparse.Namespace, world_size: int, gpus: list[GpuType], model: nn.Module, kind: str,
                   whole_batch: Optional[str] = None) -> str:
    """The report of `--dry_run` (module docstring); SystemExit where the batch plan is refused."""
    try:
        run = estimate(args, world_size, gpus, model, kind, whole_batch)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    what = {"pretrain": "forward and backward of every mask", "finetune": "forward and backward",
            "linprobe": "the frozen encoder's forward; the head's share is negligible"}[kind]
    data_note = ("" if args.subset_size else " (ImageNet-1k's train split, as --dataset imagefolder is priced)"
                 if args.dataset == "imagefolder" else f" ({args.dataset})")
    lines = [f"dry run of {kind} ({args.config or 'command line'}): nothing read, trained, written or submitted",
             f"  model            {args.model}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; "
             f"{run.step_flops / 1e9:,.1f} GFLOP per image step ({what})",
             f"  data             {run.images:,} images per epoch{data_note}",
             *plan_lines(args, run.plan),
             f"  compute          {run.total_flops / 1e18:,.2f} EFLOP in {run.epochs} epoch(s) (forwards counted on the CPU)",
             *(cost_line(cost, world_size, MFU[kind]) for cost in run.costs)]
    return "\n".join(lines)
