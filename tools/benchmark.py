"""Throughput of pre-training: images/s of the full training step (forward, backward, AdamW) on synthetic data,
its peak memory, analytic FLOPs and model-FLOPs utilisation (MFU); or, with --mode data, the data pipeline alone,
ours against the official one (torchvision's ImageFolder, PIL and MAE's transform) in interleaved rounds.

    python tools/benchmark.py --model mae_vit_base_patch16 --batch_size 8 --input_size 224 --precision fp32 --steps 10
    python tools/benchmark.py --model mae_vit_tiny_patch4 --batch_size 128 --vs fused_attn=false   # a lever, A/B
    python tools/benchmark.py --mode data --dataset imagefolder --data_path /data/imagenet --num_workers 4
    python tools/make_benchmark_jpegs.py --output_dir jpegs && python tools/benchmark.py --mode data --data_path jpegs

A configuration's step time is the median of --steps timed steps after --warmup untimed ones (CUDA events on a
GPU, a host clock on the CPU, where execution is synchronous). Each `--vs KEY=VALUE` adds a second configuration,
this one with those flags changed; the two run interleaved (ABAB, the order alternating every round) in one
process, so machine noise hits both alike, and the ratio B/A of their images/s is printed. Output: a table, then
one JSON line per configuration. docs/PERFORMANCE.md has the figures and how they were taken.

FLOPs (`forward_flops_per_image`): multiply-adds of the matrix products counted as 2 FLOPs each, from the model's
shapes: the patch-embedding convolution, every Linear layer of the encoder and decoder blocks at the number of
tokens that block sees (encoder: 1 + visible patches, decoder: 1 + all patches), attention's QK^T and AV, the
decoder's embedding and prediction layers. Norms, softmax, GELU, the loss and the optimizer are not counted (under
1% at ViT-B), nor are heads outside the encoder and decoder (MI-MAE's projector and V, under 1%). A training step
counts 3x the forward (the backward computes gradients for inputs and for weights), the usual MFU convention,
also for the patch embedding whose input gradient is never computed (+0.4% at ViT-B/16). MAE ViT-B/16 at 224 px:
19.6 GFLOPs forward, 58.7 training, per image. MFU = images/s x training FLOPs per image / peak FLOP/s.
"""
import argparse
import ctypes
import json
import re
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import timm
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine_pretrain import PretrainTask, build_optimizer, compile_model, optimizer_step, set_fused_attn  # noqa: E402
from util.config import bool_flag  # noqa: E402
from util.mim import num_visible, random_masking  # noqa: E402
from util.precision import autocast_for, grad_scaler_for, resolve_tf32, set_tf32  # noqa: E402
from util.registry import add_method_args, create_model, method_for, pretrain_models  # noqa: E402

PRECISIONS = {"fp32": "none", "bf16": "bf16", "fp16": "fp16"}
MATMUL_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Datasheet peaks in TFLOP/s, dense (no 2:4 sparsity), SXM boards. bf16/fp16/tf32 are tensor-core rates: tf32 is
# that of float32 products with --tf32 true (the default, as in training), fp32 the plain FP32 rate (--tf32 false).
# Longest matching name first.
GPU_PEAK_TFLOPS = {
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "H100 NVL": {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 67.0},
    "H200": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 67.0},
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Pre-training throughput benchmark", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--mode", default="train", choices=["train", "data"],
                        help="train: the full training step on synthetic images; data: decoding and augmentation alone")
    parser.add_argument("--model", default="mae_vit_base_patch16", help=f"one of {pretrain_models()}")
    parser.add_argument("--batch_size", default=64, type=int, help="images per step")
    parser.add_argument("--input_size", default=None, type=int, help="default: the model's own size")
    parser.add_argument("--precision", default="bf16", choices=list(PRECISIONS), help="autocast precision (fp32: none)")
    parser.add_argument("--steps", default=10, type=int, help="timed steps (after --warmup untimed ones); the median counts")
    parser.add_argument("--warmup", default=3, type=int, help="untimed steps first (allocator, caches, compilation)")
    parser.add_argument("--mask_ratio", default=0.75, type=float, help="fraction of patches removed")
    parser.add_argument("--norm_pix_loss", default=True, type=bool_flag, help="per-patch normalised target (the recipe)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", default=None, type=int, help="torch CPU threads (default: torch's choice)")
    group = parser.add_argument_group("levers (each can be flipped for an A/B run with --vs)")
    group.add_argument("--compile", default=False, type=bool_flag, help="torch.compile the model (main_pretrain.py --compile)")
    group.add_argument("--fused_attn", default=True, type=bool_flag, help="timm's attention through F.scaled_dot_product_attention (flash/memory-efficient kernels) instead of explicit matmul-softmax-matmul (main_pretrain.py --fused_attn)")
    group.add_argument("--adamw", default="fused", choices=["fused", "foreach"], help="AdamW implementation: fused (training's) or foreach (torch's default)")
    group.add_argument("--grad_checkpointing", default=False, type=bool_flag, help="recompute block activations in the backward (main_pretrain.py --grad_checkpointing)")
    group.add_argument("--host_sync", default=False, type=bool_flag, help="read the loss on the host every step (loss.item(), as the official engine does)")
    group.add_argument("--tf32", default=True, type=bool_flag,
                       help="TF32 for float32 matrix products and convolutions where the GPU has it (compute capability >= 8), "
                            "as main_pretrain.py --tf32 (default on); the step sets it, so the configurations of a --vs run can differ")
    group.add_argument("--noise", default="loader", choices=["loader", "step"],
                       help="loader: mask noise comes with the batch (data-loader workers draw it, as in training); step: drawn inside the step")
    parser.add_argument("--vs", action="append", default=[], metavar="KEY=VALUE",
                        help="also run this configuration with flag KEY set to VALUE, interleaved with the first; repeat to change several flags")
    parser.add_argument("--peak_tflops", default=None, type=float,
                        help="device peak for MFU; default: datasheet for H100/H200 at --precision, else a measured matrix product")
    group = parser.add_argument_group("data pipeline (--mode data)")
    group.add_argument("--dataset", default="imagefolder", help="as main_pretrain.py --dataset")
    group.add_argument("--data_path", default="", help="as main_pretrain.py --data_path")
    group.add_argument("--num_workers", default=2, type=int, help="data-loading processes (0: the main process decodes)")
    group.add_argument("--batches", default=20, type=int, help="batches timed after the first (whose time is the epoch start-up)")
    group.add_argument("--rounds", default=3, type=int,
                       help="interleaved rounds of ours and the official pipeline (order alternating); medians are reported")
    group.add_argument("--data_pipeline", default="fast", choices=("fast", "pil"), help="ours: as main_pretrain.py --data_pipeline")
    group.add_argument("--stages", default=0, type=int,
                       help="also time each stage (decode, crop + resize, to tensor) both ways on this many JPEGs, one thread")
    add_method_args(parser)
    return parser


# Flags that both configurations of a --vs run share: the process, the device and the timing.
SHARED_FLAGS = ("vs", "mode", "device", "threads", "steps", "warmup")


def parse_configurations(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[argparse.Namespace]:
    """The configuration of `argv` and, if it has --vs KEY=VALUE options, a second one with those flags changed."""
    base = parser.parse_args(argv)
    if not base.vs:
        return [base]
    overrides = []
    for item in base.vs:
        key, sep, value = item.partition("=")
        if not sep or f"--{key}" not in parser._option_string_actions or key in SHARED_FLAGS:
            raise SystemExit(f"error: --vs {item!r}: expected KEY=VALUE with KEY one of this script's flags "
                             f"other than {', '.join(SHARED_FLAGS)}, which both configurations share")
        overrides += [f"--{key}", value]
    return [base, parser.parse_args([*argv, *overrides])]


# --- FLOPs -------------------------------------------------------------------------------------------------------
def block_flops(block: nn.Module, tokens: int) -> int:
    """FLOPs of one transformer block on `tokens` tokens: 2 n sum(in x out) over its Linear layers + 4 n^2 d_attn."""
    linear = sum(2 * tokens * m.in_features * m.out_features for m in block.modules() if isinstance(m, nn.Linear))
    attn_dim = block.attn.qkv.out_features // 3
    return linear + 4 * tokens * tokens * attn_dim  # QK^T and AV: n x n x d each, summed over heads


def linear_flops(layer: nn.Linear, tokens: int) -> int:
    return 2 * tokens * layer.in_features * layer.out_features


def forward_flops_per_image(model: nn.Module) -> int:
    """Matrix-product FLOPs of one image's forward pass through an MAE-family model (module docstring).

    The patch embedding runs once per image; encoder and decoder run `sequences_per_image` times (MI-MAE: N masks).
    """
    num_patches = model.num_patches
    encoder_tokens = 1 + num_visible(num_patches, model.mask_ratio)
    decoder_tokens = 1 + num_patches
    patch_embed = 2 * num_patches * model.patch_embed.proj.weight.numel()  # each patch: (C p p) x D multiply-adds
    sequence = (sum(block_flops(b, encoder_tokens) for b in model.blocks)
                + linear_flops(model.decoder_embed, encoder_tokens)
                + sum(block_flops(b, decoder_tokens) for b in model.decoder_blocks)
                + linear_flops(model.decoder_pred, decoder_tokens))
    return patch_embed + model.sequences_per_image * sequence


def train_flops_per_image(model: nn.Module) -> int:
    """Forward + backward: 3x the forward (module docstring)."""
    return 3 * forward_flops_per_image(model)


# --- timing, memory, peak ----------------------------------------------------------------------------------------
def time_call(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds `fn` takes on `device`: CUDA events around it on a GPU, the host clock on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def _status_mb(field: str) -> Optional[float]:
    """A memory field of /proc/self/status (Linux) in MB; None elsewhere."""
    try:
        return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024
    except (OSError, AttributeError):
        return None


def reset_peak_memory(device: torch.device) -> Optional[float]:
    """Start a new peak; returns the memory in use now (MB), None where unknown.

    CUDA: the allocator's statistics and the memory tensors hold. CPU (Linux): glibc's allocator first returns
    the memory it keeps after tensors are freed (malloc_trim), so that the resident set is the live memory; then
    the resident high-water mark (VmHWM) is reset to it.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current resident size
    except (OSError, AttributeError):
        return None  # not Linux with glibc: the peak is then the whole process's (ru_maxrss)
    return _status_mb("VmRSS")


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: the most memory tensors held since the reset. CPU: the process's peak resident set since the reset,
    which includes weights, optimizer state, Python and libraries."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def measure_step_memory(step: Callable[[], None], device: torch.device) -> tuple[float, Optional[float]]:
    """(peak MB, MB the step added to what was in use before it: activations, gradients, temporaries) of one
    untimed step; untimed because on the CPU handing freed memory back costs page faults in the next step."""
    before = reset_peak_memory(device)
    step()
    peak = peak_memory_mb(device)
    return peak, None if before is None else peak - before


def measure_matmul_tflops(device: torch.device, precision: str, size: Optional[int] = None, repeats: int = 5) -> float:
    """Best of `repeats` square matrix products in `precision`'s dtype (tf32: float32 with TF32 on, on a GPU): the
    device's practical matmul peak."""
    size = size or (8192 if device.type == "cuda" else 2048)
    if device.type == "cuda":
        set_tf32(precision == "tf32")
    a, b = (torch.randn(size, size, device=device, dtype=MATMUL_DTYPES[precision]) for _ in range(2))
    a @ b  # warm-up: library handles, thread pools
    best = min(time_call(lambda: a @ b, device) for _ in range(repeats))
    return 2 * size**3 / best / 1e12


def default_peak_tflops(device: torch.device, precision: str) -> tuple[float, str]:
    """(peak TFLOP/s, where it comes from): a datasheet value for known GPUs, else measured on the spot."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):
            if key in name:
                return GPU_PEAK_TFLOPS[key][precision], f"datasheet {key} {precision} dense"
    return measure_matmul_tflops(device, precision), f"measured {precision} matmul"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


# --- the training step -------------------------------------------------------------------------------------------
def build_model(args: argparse.Namespace, device: torch.device) -> nn.Module:
    """The registered model as main_pretrain.py builds it from these flags (its own size without --input_size)."""
    kwargs = method_for(args.model).model_kwargs(args)
    if args.input_size is None:
        del kwargs["img_size"]
    torch.manual_seed(0)
    model = create_model(args.model, **kwargs).to(device)
    set_fused_attn(model, args.fused_attn)
    if args.grad_checkpointing:
        model.set_grad_checkpointing()
    return model


def build_training_step(args: argparse.Namespace, device: torch.device) -> tuple[Callable[[], None], nn.Module]:
    """The engine's step (forward, backward, AdamW, zero_grad) on one synthetic batch; returns (step, model).

    The online probe is off, as a benchmark has no labels; masks come from noise drawn with the batch as the data
    loader's workers do (--noise loader) or inside the step.
    """
    model = build_model(args, device)
    task = PretrainTask(model)
    optimizer = build_optimizer(task, argparse.Namespace(weight_decay=0.05, lr=1e-4))
    if args.adamw == "foreach":
        for group in optimizer.param_groups:  # AdamW reads these per group at every step
            group["fused"], group["foreach"] = False, True
    if args.compile:
        compile_model(model)
    amp = PRECISIONS[args.precision]
    scaler = grad_scaler_for(device, amp)
    tf32 = resolve_tf32(args.tf32, device)
    size = model.patch_embed.img_size[0]
    images = torch.randn(args.batch_size, 3, size, size, device=device)
    labels = torch.zeros(args.batch_size, dtype=torch.long, device=device)
    loader_noise = model.draw_noise(images) if args.noise == "loader" else None

    def step() -> None:
        if device.type == "cuda":  # a process-wide flag: set per step, as the two configurations of --vs alternate
            set_tf32(tf32)
        with autocast_for(device, amp):
            loss, _ = task(images, labels, loader_noise)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        optimizer_step(task, optimizer, scaler, None)
        if args.host_sync:
            loss.item()

    return step, model


def masking_seconds(model: nn.Module, batch_size: int, device: torch.device, repeats: int = 10) -> float:
    """Median time of building the batch's masks from noise on `device` (the argsorts): the most that moving mask
    construction into the data-loader workers, as index tensors, could save per step."""
    noise = model.draw_noise(torch.empty(batch_size, 1, device=device))
    if hasattr(model, "mask_noise"):  # MI-MAE: N masks per image
        noise = model.mask_noise(noise)
    return statistics.median(time_call(lambda: random_masking(noise, model.mask_ratio), device) for _ in range(repeats))


def run_interleaved(steps: list[Callable[[], None]], device: torch.device, warmup: int, rounds: int) -> list[dict]:
    """Warm each step up, time them in alternating order (AB, BA, AB, ...), then measure each one's memory in one
    more step (`measure_step_memory`). Per step: its times (s), peak_mem_mb and step_mem_mb."""
    for step in steps:
        for _ in range(warmup):
            step()
    times: list[list[float]] = [[] for _ in steps]
    for i in range(rounds):
        for k in range(len(steps)) if i % 2 == 0 else reversed(range(len(steps))):
            times[k].append(time_call(steps[k], device))
    results = []
    for step, step_times in zip(steps, times):
        peak, added = measure_step_memory(step, device)
        results.append({"times": step_times, "peak_mem_mb": peak, "step_mem_mb": added})
    return results


def run_train(configs: list[argparse.Namespace], device: torch.device) -> list[dict]:
    built = [build_training_step(c, device) for c in configs]
    timed = run_interleaved([step for step, _ in built], device, configs[0].warmup, configs[0].steps)
    peaks: dict[str, tuple[float, str]] = {}  # measured once per precision
    results = []
    for config, (_, model), measured in zip(configs, built, timed):
        tf32 = resolve_tf32(config.tf32, device)
        peak_precision = "tf32" if config.precision == "fp32" and tf32 else config.precision
        if config.peak_tflops:
            peak, peak_source = config.peak_tflops, "--peak_tflops"
        else:
            if peak_precision not in peaks:
                peaks[peak_precision] = default_peak_tflops(device, peak_precision)
            peak, peak_source = peaks[peak_precision]
        median = statistics.median(measured["times"])
        img_per_s = config.batch_size / median
        flops = train_flops_per_image(model)
        results.append({
            "model": config.model, "batch_size": config.batch_size, "input_size": model.patch_embed.img_size[0],
            "precision": config.precision, "device": device_name(device),
            "img_per_s": round(img_per_s, 2), "peak_mem_mb": round(measured["peak_mem_mb"], 1),
            "step_mem_mb": None if measured["step_mem_mb"] is None else round(measured["step_mem_mb"], 1),
            "mfu": round(img_per_s * flops / (peak * 1e12), 4),
            "train_gflops_per_image": round(flops / 1e9, 3), "peak_tflops": round(peak, 3), "peak_source": peak_source,
            "median_step_s": round(median, 5), "steps": config.steps,
            "step_ms": [round(t * 1000, 1) for t in measured["times"]],  # in order: shows drift and bursts of noise
            "masking_ms": round(masking_seconds(model, config.batch_size, device) * 1000, 3),
            **{lever: getattr(config, lever) for lever in ("compile", "fused_attn", "adamw", "grad_checkpointing", "host_sync", "noise")},
            "tf32": tf32,  # whether it ran: asked for, on a GPU that has it
            "torch": torch.__version__, "timm": timm.__version__,
        })
    return results


# --- the data pipeline -------------------------------------------------------------------------------------------
def official_transform(size: int) -> Callable:
    """The official MAE pre-training transform (its main_pretrain.py), built here from torchvision: PIL image in,
    RandomResizedCrop(size, scale=(0.2, 1), bicubic), RandomHorizontalFlip, ToTensor, Normalize(ImageNet)."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])


def data_loaders(config: argparse.Namespace) -> tuple[dict[str, torch.utils.data.DataLoader], int]:
    """{"ours": main_pretrain.py's training set (its dataset, --data_pipeline transform, per-sample seeds and mask
    noise), "official": torchvision's ImageFolder with PIL's loader and `official_transform`} on --data_path, and
    the input size."""
    from torchvision import datasets

    from util.datasets import SeededDataset, TrainData, build_dataset

    if not config.data_path:
        raise SystemExit("error: --mode data needs --data_path (and --dataset)")
    model = build_model(config, torch.device("cpu"))
    size = model.patch_embed.img_size[0]
    transform = TrainData(argparse.Namespace(input_size=size, data_pipeline=config.data_pipeline)).image_transform()
    ours = SeededDataset(build_dataset(config.dataset, config.data_path, "train", transform), seed=0,
                         noise_size=model.noise_per_sample)
    sets = {"ours": ours}
    train = Path(config.data_path) / "train"
    if config.dataset == "imagefolder":  # the official loader needs class folders: train/<class>/ or <class>/
        try:
            sets["official"] = datasets.ImageFolder(str(train if train.is_dir() else config.data_path), official_transform(size))
        except FileNotFoundError:
            pass
    loaders = {name: torch.utils.data.DataLoader(data, batch_size=config.batch_size, num_workers=config.num_workers,
                                                 shuffle=True, drop_last=True) for name, data in sets.items()}
    short = [name for name, loader in loaders.items() if len(loader) < config.batches + 1]
    if short:
        raise SystemExit(f"error: --data_path has too few images for {config.batches + 1} batches of {config.batch_size}; "
                         f"lower --batches or --batch_size")
    return loaders, size


def time_loader(loader: torch.utils.data.DataLoader, batches: int) -> tuple[float, float]:
    """(seconds to the first batch: the epoch start-up, workers forked; images/s over the `batches` after it)."""
    begin = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    first = time.perf_counter() - begin
    begin = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    seconds = time.perf_counter() - begin
    del iterator  # its workers stop before the next pipeline's start
    return first, batches * loader.batch_size / seconds


def stage_times(files: list[Path], size: int, repeats: int = 3) -> dict[str, float]:
    """Median ms per image of each stage on one thread, the official way and ours, on the same files and boxes:
    decode (PIL; torchvision.io's libjpeg-turbo), crop + resize (PIL's bicubic; torch's antialiased bicubic on
    uint8), to the model's input (ToTensor + Normalize in the worker; a uint8 tensor, normalised on the device)."""
    import numpy as np
    from PIL import Image
    from torchvision import transforms
    from torchvision.transforms import functional as TF

    from util.fast_augment import decode_rgb, read_encoded

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    bicubic = transforms.InterpolationMode.BICUBIC
    encoded = [read_encoded(str(f)) for f in files]
    pils = [Image.open(f).convert("RGB") for f in files]
    tensors = [decode_rgb(e) for e in encoded]
    generator = torch.Generator().manual_seed(0)
    boxes = []
    for image in pils:
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
        boxes.append(transforms.RandomResizedCrop.get_params(image, [0.2, 1.0], [3 / 4, 4 / 3]))
    crops = [TF.resized_crop(p, *b, [size, size], bicubic) for p, b in zip(pils, boxes)]
    normalize = official_transform(size).transforms[-1]  # the official pipeline's Normalize
    stages = {
        "decode_pil": lambda i: Image.open(files[i]).convert("RGB"),
        "decode_torchvision": lambda i: decode_rgb(encoded[i]),
        "resize_pil_bicubic": lambda i: TF.resized_crop(pils[i], *boxes[i], [size, size], bicubic),
        "resize_torch_uint8_bicubic": lambda i: torch.nn.functional.interpolate(
            tensors[i][None, :, boxes[i][0]:boxes[i][0] + boxes[i][2], boxes[i][1]:boxes[i][1] + boxes[i][3]],
            size=(size, size), mode="bicubic", antialias=True),
        "to_tensor_normalize": lambda i: normalize(TF.to_tensor(crops[i])),
        "to_uint8_tensor": lambda i: torch.from_numpy(np.array(crops[i])).permute(2, 0, 1).contiguous(),
    }
    times = {}
    for name, stage in stages.items():
        rounds = []
        for _ in range(repeats):
            begin = time.perf_counter()
            for index in range(len(files)):
                stage(index)
            rounds.append((time.perf_counter() - begin) / len(files) * 1e3)
        times[name] = round(statistics.median(rounds), 3)
    torch.set_num_threads(threads)
    return times


def run_data(config: argparse.Namespace) -> list[dict]:
    """Decoded and augmented images/s of ours and of the official pipeline, in --rounds interleaved rounds (the
    order alternating), medians reported; with an image folder without class folders, ours alone.

    The first batch of each round's epoch is its start-up (workers forked, first images decoded), which
    non-persistent workers pay every epoch; images/s counts the --batches after it.
    """
    loaders, size = data_loaders(config)
    names = list(loaders)
    timings: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for round_index in range(config.rounds):
        for name in names if round_index % 2 == 0 else names[::-1]:
            timings[name].append(time_loader(loaders[name], config.batches))
    results = []
    for name in names:
        img_per_s = statistics.median(rate for _, rate in timings[name])
        results.append({"mode": "data", "pipeline": name if name == "official" else f"ours ({config.data_pipeline})",
                        "dataset": config.dataset, "input_size": size, "batch_size": config.batch_size,
                        "num_workers": config.num_workers, "img_per_s": round(img_per_s, 1),
                        "img_per_s_per_worker": round(img_per_s / max(config.num_workers, 1), 1),
                        "epoch_startup_s": round(statistics.median(first for first, _ in timings[name]), 3),
                        "rounds": config.rounds, "device": "cpu"})
    if len(results) == 2:
        results[0]["vs_official"] = round(results[0]["img_per_s"] / results[1]["img_per_s"], 2)
        results[1]["vs_official"] = 1.0
    if config.stages:
        files = sorted(p for p in Path(config.data_path).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))[:config.stages]
        if not files:
            raise SystemExit(f"error: --stages times JPEG decoding, but --data_path {config.data_path} holds no .jpg files")
        results.append({"mode": "data", "pipeline": f"stages, ms per image (1 thread, {len(files)} JPEGs)",
                        **stage_times(files, size)})
    return results


def print_table(results: list[dict]) -> None:
    columns = ["model", "batch_size", "input_size", "precision", "img_per_s", "mfu", "peak_mem_mb", "step_mem_mb", "masking_ms",
               "compile", "fused_attn", "adamw", "grad_checkpointing", "host_sync", "noise", "tf32"]
    if "mode" in results[0]:  # data rows: one table per kind of row (pipelines, stage times)
        kinds = {tuple(result): [r for r in results if tuple(r) == tuple(result)] for result in results}
        for keys, rows in kinds.items():
            print(" | ".join(keys))
            for row in rows:
                print(" | ".join(str(row[k]) for k in keys))
        return
    columns = [c for c in columns if c in results[0]]
    print(" | ".join(columns))
    for result in results:
        print(" | ".join(str(result.get(c)) for c in columns))
    if len(results) == 2:
        print(f"B/A images/s: {results[1]['img_per_s'] / results[0]['img_per_s']:.3f}")


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    configs = parse_configurations(get_args_parser(), sys.argv[1:] if argv is None else argv)
    if configs[0].threads:
        torch.set_num_threads(configs[0].threads)
    if configs[0].mode == "data":
        results = [result for c in configs for result in run_data(c)]
    else:
        results = run_train(configs, torch.device(configs[0].device))
    print_table(results)
    for result in results:
        print(json.dumps(result))
    return results


if __name__ == "__main__":
    main()
