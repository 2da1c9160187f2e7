"""This codebase's pre-training step against the official MAE code's, same machine, process, model, batch and
precision, timed interleaved (ABAB, order alternating every round) so that machine noise hits both alike.

    python tools/compare_official.py --official_path /path/to/facebookresearch/mae --model mae_vit_base_patch16 \
        --batch_size 8 --input_size 224 --precision fp32 --steps 20

The official code is imported from --official_path, a checkout of facebookresearch/mae (never copied into this
repository), with two compatibility shims for timm 1.x applied at import time (`load_official_mae`). Both models
are the same architecture (ours: MAE_SIZES; theirs: their MaskedAutoencoderViT at those sizes) and start from the
same weights (ours loaded into theirs: the keys are the same); one forward with the same seed checks that both
compute the same loss before anything is timed.

--official_step engine times the step as their engine_pretrain.py runs it: autocast forward, loss.item() and its
finiteness check, their loss scaler (backward, unscale, the unclipped gradient norm it computes every step,
optimizer step), zero_grad, and torch.cuda.synchronize() on a GPU; AdamW as their main_pretrain.py builds it
(torch's default implementation). --official_step model keeps only forward, backward, AdamW and zero_grad, to
separate the model's speed from the engine's. Neither side includes the lr schedule or logging. Our step is
tools/benchmark.py's (the engine's: fused AdamW, no host sync, masks from noise that comes with the batch). On a GPU
our step runs with --tf32 (default on, as training), theirs with PyTorch's TF32 defaults, which their code keeps.
"""
import argparse
import json
import math
import statistics
import sys
import types
from functools import partial
from importlib.util import module_from_spec, spec_from_file_location
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import timm
import timm.models.vision_transformer as timm_vit
import torch
import torch.nn as nn
from timm.optim import param_groups_weight_decay

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine_pretrain import set_fused_attn  # noqa: E402
from models_mae import MAE_SIZES  # noqa: E402
from tools import benchmark  # noqa: E402
from util.config import bool_flag  # noqa: E402
from util.precision import autocast_for, resolve_tf32  # noqa: E402


class BlockIgnoringQkScale(timm_vit.Block):
    """timm 1.x's Block, accepting the `qk_scale` argument that timm 0.3's took and the official code passes (None:
    the default 1/sqrt(head_dim), which timm 1.x always uses)."""

    def __init__(self, *args, qk_scale: Optional[float] = None, **kwargs):
        if qk_scale is not None:
            raise ValueError(f"qk_scale={qk_scale}: timm 1.x's attention only uses 1/sqrt(head_dim)")
        super().__init__(*args, **kwargs)


def _exec_module(name: str, path: Path) -> types.ModuleType:
    spec = spec_from_file_location(name, path)
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def numpy_with_float() -> types.ModuleType:
    """numpy as a module object of its own whose `float` is the builtin it aliased before NumPy 1.24 removed it."""
    shim = types.ModuleType("numpy")
    shim.__dict__.update({k: v for k, v in vars(np).items() if not k.startswith("__")})
    shim.float = float
    return shim


def load_official_mae(official_path: str) -> types.ModuleType:
    """Import facebookresearch/mae's models_mae.py from a checkout, with two shims for timm 1.x and NumPy 2:

    - timm.models.vision_transformer.Block is `BlockIgnoringQkScale` while their file is imported (it binds the
      name at import), then timm's own again;
    - their util/pos_embed.py sees a numpy with `np.float` restored (its module-level `np` only; ours is untouched).
    Their `util` package would clash with ours, so `util` and `util.pos_embed` name theirs in sys.modules only
    while models_mae.py is executed.
    """
    root = Path(official_path)
    for relative in ("models_mae.py", "util/pos_embed.py"):
        if not (root / relative).is_file():
            raise SystemExit(f"error: --official_path {official_path}: no {relative}; "
                             "expected a checkout of github.com/facebookresearch/mae")
    pos_embed = _exec_module("official_mae_pos_embed", root / "util" / "pos_embed.py")
    pos_embed.np = numpy_with_float()
    util_package = types.ModuleType("util")
    util_package.pos_embed = pos_embed
    saved_modules = {name: sys.modules.get(name) for name in ("util", "util.pos_embed")}
    original_block = timm_vit.Block
    sys.modules["util"], sys.modules["util.pos_embed"] = util_package, pos_embed
    timm_vit.Block = BlockIgnoringQkScale
    try:
        return _exec_module("official_models_mae", root / "models_mae.py")
    finally:
        timm_vit.Block = original_block
        for name, module in saved_modules.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def build_official_model(official: types.ModuleType, ours: nn.Module, args: argparse.Namespace) -> nn.Module:
    """Their MaskedAutoencoderViT at our model's architecture, holding our model's weights."""
    size = args.model.removeprefix("mae_")
    config = {**MAE_SIZES[size], "img_size": ours.patch_embed.img_size[0]}
    model = official.MaskedAutoencoderViT(**config, mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                                          norm_pix_loss=args.norm_pix_loss).to(ours.cls_token.device)
    model.load_state_dict(ours.state_dict())
    set_fused_attn(model, args.official_fused_attn)
    return model


def check_same_loss(ours: nn.Module, official: nn.Module, images: torch.Tensor, mask_ratio: float) -> tuple[float, float]:
    """Both models' loss on the same images and masks: theirs draws (B, L) uniform mask noise from the global
    generator, ours is given the same draw (a compiled model's own random numbers would differ)."""
    with torch.no_grad():
        torch.manual_seed(1)
        noise = torch.rand(images.shape[0], ours.num_patches, device=images.device)
        ours_loss = ours(images, noise).loss.item()
        torch.manual_seed(1)
        official_loss = official(images, mask_ratio=mask_ratio)[0].item()
    if not math.isclose(ours_loss, official_loss, rel_tol=1e-4):
        raise SystemExit(f"error: the models differ: loss {ours_loss} (ours) vs {official_loss} (official)")
    return ours_loss, official_loss


def build_official_step(model: nn.Module, images: torch.Tensor, args: argparse.Namespace) -> Callable[[], None]:
    """Their training step (module docstring), on one synthetic batch."""
    device = images.device
    groups = param_groups_weight_decay(model, 0.05)  # their optim_factory.add_weight_decay, renamed
    optimizer = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95))
    amp = benchmark.PRECISIONS[args.official_precision]
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        if device.type == "cuda":  # PyTorch's defaults, which their code keeps: TF32 for convolutions, not for matmuls
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
        with autocast_for(device, amp):
            loss, _, _ = model(images, mask_ratio=args.mask_ratio)
        engine = args.official_step == "engine"
        if engine and not math.isfinite(loss.item()):
            raise SystemExit("official step: the loss is not finite")
        scaler.scale(loss).backward()
        if engine:  # their loss scaler unscales and computes the unclipped gradient norm every step
            scaler.unscale_(optimizer)
            torch.norm(torch.stack([torch.norm(p.grad.detach(), 2.0) for p in params if p.grad is not None]), 2.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        if engine and device.type == "cuda":
            torch.cuda.synchronize()

    return step


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Ours vs the official MAE code", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--official_path", required=True, help="a checkout of github.com/facebookresearch/mae")
    parser.add_argument("--model", default="mae_vit_base_patch16", help=f"an MAE model: one of mae_{{{', '.join(MAE_SIZES)}}}")
    parser.add_argument("--batch_size", default=8, type=int)
    parser.add_argument("--input_size", default=None, type=int, help="default: the model's own size")
    parser.add_argument("--precision", default="fp32", choices=list(benchmark.PRECISIONS), help="autocast precision of both (fp32: none)")
    parser.add_argument("--official_precision", default=None, choices=list(benchmark.PRECISIONS),
                        help="the official step's own precision (their engine: fp16 on a GPU); default --precision")
    parser.add_argument("--official_step", default="engine", choices=["engine", "model"],
                        help="engine: their engine's whole step; model: forward, backward, AdamW only")
    parser.add_argument("--steps", default=20, type=int, help="timed rounds; each times one step of each")
    parser.add_argument("--warmup", default=3, type=int)
    parser.add_argument("--mask_ratio", default=0.75, type=float)
    parser.add_argument("--norm_pix_loss", default=True, type=bool_flag)
    parser.add_argument("--fused_attn", default=True, type=bool_flag,
                        help="our attention through F.scaled_dot_product_attention (timm's default) or explicit matmul-softmax-matmul")
    parser.add_argument("--official_fused_attn", default=None, type=bool_flag,
                        help="the same for the official model (it builds timm's Block too); default --fused_attn")
    parser.add_argument("--compile", default=False, type=bool_flag, help="torch.compile our model (main_pretrain.py --compile)")
    parser.add_argument("--tf32", default=True, type=bool_flag,
                        help="our step with TF32 for float32 products on GPUs that have it (main_pretrain.py --tf32, default on); "
                             "the official step keeps PyTorch's defaults (TF32 for convolutions only)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", default=None, type=int, help="torch CPU threads (default: torch's choice)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = get_args_parser().parse_args(argv)
    args.official_precision = args.official_precision or args.precision
    if args.official_fused_attn is None:
        args.official_fused_attn = args.fused_attn
    if args.model.removeprefix("mae_") not in MAE_SIZES or not args.model.startswith("mae_"):
        raise SystemExit(f"error: --model {args.model}: the official code has plain MAE only; "
                         f"choose one of {['mae_' + s for s in MAE_SIZES]}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    official_module = load_official_mae(args.official_path)

    ours_argv = ["--model", args.model, "--batch_size", str(args.batch_size), "--precision", args.precision,
                 "--mask_ratio", str(args.mask_ratio), "--norm_pix_loss", str(args.norm_pix_loss),
                 "--fused_attn", str(args.fused_attn), "--compile", str(args.compile), "--tf32", str(args.tf32),
                 "--device", args.device]
    if args.input_size:
        ours_argv += ["--input_size", str(args.input_size)]
    ours_args = benchmark.get_args_parser().parse_args(ours_argv)
    ours_step, ours_model = benchmark.build_training_step(ours_args, device)
    official_model = build_official_model(official_module, ours_model, args)
    size = ours_model.patch_embed.img_size[0]
    images = torch.randn(args.batch_size, 3, size, size, device=device)
    losses = check_same_loss(ours_model, official_model, images[:2], args.mask_ratio)
    official_step = build_official_step(official_model, images, args)

    ours, official = benchmark.run_interleaved([ours_step, official_step], device, args.warmup, args.steps)
    ours_s, official_s = statistics.median(ours["times"]), statistics.median(official["times"])
    round_ratios = [o / u for u, o in zip(ours["times"], official["times"])]
    result = {
        "model": args.model, "batch_size": args.batch_size, "input_size": size, "precision": args.precision,
        "official_precision": args.official_precision, "official_step": args.official_step, "compile": args.compile,
        "fused_attn": args.fused_attn, "official_fused_attn": args.official_fused_attn, "tf32": resolve_tf32(args.tf32, device),
        "device": benchmark.device_name(device), "steps": args.steps,
        "ours_img_per_s": round(args.batch_size / ours_s, 2), "official_img_per_s": round(args.batch_size / official_s, 2),
        "ratio": round(official_s / ours_s, 3), "median_round_ratio": round(statistics.median(round_ratios), 3),
        "ours_peak_mem_mb": round(ours["peak_mem_mb"], 1), "official_peak_mem_mb": round(official["peak_mem_mb"], 1),
        "ours_step_mem_mb": ours["step_mem_mb"], "official_step_mem_mb": official["step_mem_mb"],
        "loss_ours": round(losses[0], 5), "loss_official": round(losses[1], 5),
        "torch": torch.__version__, "timm": timm.__version__,
    }
    print(f"{args.model} batch {args.batch_size} {size}px {args.precision} on {result['device']}, median of {args.steps} "
          f"interleaved rounds:\n  ours     {result['ours_img_per_s']:9.2f} img/s\n  official {result['official_img_per_s']:9.2f} img/s "
          f"({args.official_step} step, {args.official_precision})\n  ratio    {result['ratio']:9.3f}  "
          f"(median of per-round ratios {result['median_round_ratio']:.3f})")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
