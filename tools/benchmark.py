"""Images/s of the full pre-training step (forward, backward, optimizer) on synthetic data.

    python tools/benchmark.py --model mae_vit_base_patch16 --batch_size 8 --input_size 224 --precision fp32 --steps 10

Prints one line per timed step, a summary, and last one JSON line with `img_per_s` (median step time).
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine_pretrain import PretrainTask, autocast_for, optimizer_step  # noqa: E402
from main_pretrain import build_optimizer  # noqa: E402
from util.config import bool_flag  # noqa: E402
from util.registry import add_method_args, create_model, method_for, pretrain_models  # noqa: E402

PRECISIONS = {"fp32": "none", "bf16": "bf16", "fp16": "fp16"}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Pre-training step benchmark", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="mae_vit_base_patch16", help=f"one of {pretrain_models()}")
    parser.add_argument("--batch_size", default=64, type=int, help="images per step")
    parser.add_argument("--input_size", default=None, type=int, help="default: the model's own size")
    parser.add_argument("--precision", default="bf16", choices=list(PRECISIONS))
    parser.add_argument("--steps", default=10, type=int, help="timed steps (after --warmup untimed ones)")
    parser.add_argument("--warmup", default=3, type=int, help="untimed steps first (allocator, caches)")
    parser.add_argument("--mask_ratio", default=0.75, type=float, help="fraction of patches removed")
    parser.add_argument("--norm_pix_loss", default=True, type=bool_flag, help="per-patch normalised target (the recipe)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", default=None, type=int, help="torch CPU threads (default: torch's choice)")
    add_method_args(parser)
    return parser


def main(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    kwargs = method_for(args.model).model_kwargs(args)
    if args.input_size is None:
        del kwargs["img_size"]  # the factory's own size
    task = PretrainTask(create_model(args.model, **kwargs)).to(device)
    size = task.model.patch_embed.img_size[0]
    optimizer = build_optimizer(task, argparse.Namespace(weight_decay=0.05, lr=1e-4))
    amp = PRECISIONS[args.precision]
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    images = torch.randn(args.batch_size, 3, size, size, device=device)
    labels = torch.zeros(args.batch_size, dtype=torch.long, device=device)
    cuda = device.type == "cuda"

    def step() -> None:
        with autocast_for(device, amp):
            loss, _ = task(images, labels)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        optimizer_step(task, optimizer, scaler, None)

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1000
        else:
            begin = time.perf_counter()
            step()
            seconds = time.perf_counter() - begin
        times.append(seconds)
        print(f"step {i}: {seconds * 1000:.1f} ms  {args.batch_size / seconds:.1f} img/s")
    median = statistics.median(times)
    result = {
        "model": args.model, "batch_size": args.batch_size, "input_size": size, "precision": args.precision,
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__, "steps": args.steps, "median_step_s": round(median, 5),
        "img_per_s": round(args.batch_size / median, 2),
        "peak_mem_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if cuda else None,
    }
    print(f"{args.model} batch {args.batch_size} {size}px {args.precision} on {result['device']}: "
          f"{result['img_per_s']} img/s (median of {args.steps} steps)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
