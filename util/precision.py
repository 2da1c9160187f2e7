"""The precision policy of every script: what `--amp auto` means on each device, the autocast context, the
GradScaler fp16 needs, and TF32 for float32 matrix products and convolutions (`--tf32`).

`--amp auto` picks the fastest precision the device computes natively:
- CUDA, compute capability >= 8 (Ampere, Hopper, Blackwell, ...): bf16, which needs no loss scaling;
- CUDA, compute capability 7.x (Volta V100, Turing T4): fp16 with a GradScaler, as the official MAE code does.
  `torch.cuda.is_bf16_supported()` says True there too, but only through emulation (its `including_emulation`
  default): the tensor cores of sm70/sm75 have no bf16, so the capability is read instead;
- CPUs with AVX-512 BF16 or AMX: bf16; other CPUs emulate bf16 many times slower than fp32, so none;
- anything else (older GPUs, other devices): none (fp32).

TF32 (`--tf32 true`, the default) lets cuBLAS and cuDNN compute float32 matrix products and convolutions on the
tensor cores of compute capability >= 8, with 10-bit mantissa inputs and float32 accumulation. It speeds up all of
`--amp none` and the float32 work done outside autocast under `--amp bf16/fp16`. It is set through the
`torch.backends` flags, which reach CUDA only: on a CPU nothing is changed (not even oneDNN's precision, which
`torch.set_float32_matmul_precision` would also set).
"""
from contextlib import nullcontext
from typing import Optional

import torch

from util.config import bool_flag

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
AMP_CHOICES = ("auto", *AMP_DTYPES)
AMP_HELP = ("autocast precision. auto (default): bf16 where the device computes it natively (CUDA GPUs of compute "
            "capability 8.0 or later: A100, H100, ...; CPUs with AVX-512 BF16 or AMX); fp16 with a GradScaler on "
            "GPUs of compute capability 7.x (V100, T4), as the official MAE code, since their tensor cores have no "
            "bf16 (torch.cuda.is_bf16_supported() says True there only through emulation); else none, since emulated "
            "bf16 runs many times slower than fp32. bf16 needs no loss scaling; fp16 adds a GradScaler and can "
            "overflow with large models. An explicit bf16 on a GPU without bf16 tensor cores (V100, T4) is refused "
            "before any work. args.yaml records what ran")
TF32_HELP = ("TF32 tensor cores for float32 matrix products and convolutions on GPUs of compute capability 8.0 or later "
             "(A100, H100, ...): all of --amp none, and the float32 work outside autocast; 10-bit mantissa inputs, "
             "float32 accumulation. false: full float32 (IEEE) products. Nothing changes on a CPU or an older GPU; "
             "args.yaml records whether it was on")


def add_precision_args(group) -> None:
    """--amp and --tf32, for an argparse parser or argument group."""
    group.add_argument("--amp", default="auto", choices=AMP_CHOICES, help=AMP_HELP)
    group.add_argument("--tf32", default=True, type=bool_flag, help=TF32_HELP)


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device; (0, 0) when CUDA is not available."""
    if not torch.cuda.is_available():
        return (0, 0)
    return tuple(torch.cuda.get_device_capability(device))


def amp_for_gpu(capability: tuple[int, int]) -> str:
    """What `--amp auto` picks on a CUDA GPU of this compute capability (present or not: tools/check_env.py)."""
    if capability[0] >= 8:
        return "bf16"
    return "fp16" if capability[0] == 7 else "none"


def resolve_amp(amp: str, device: torch.device) -> str:
    """`--amp auto` -> bf16, fp16 or none for `device` (module docstring); any other value is returned as given,
    except bf16 on a GPU without bf16 tensor cores (compute capability < 8: V100, T4), a ValueError naming the fix:
    torch would emulate it there, many times slower than fp16, without a word."""
    if amp == "bf16" and device.type == "cuda" and cuda_capability(device)[0] < 8:
        major, minor = cuda_capability(device)
        raise ValueError(f"--amp bf16: the GPU {torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) "
                         f"has no bf16 tensor cores, so bf16 would be emulated, many times slower. Use --amp auto, which "
                         f"trains there in fp16 with a GradScaler, as the official MAE code does on V100s (or --amp fp16)")
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return amp_for_gpu(cuda_capability(device))
    if device.type == "cpu":
        return "bf16" if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported() else "none"
    return "none"


def autocast_for(device: torch.device, amp: str):
    """The autocast context of a resolved --amp value (a no-op for none)."""
    dtype = AMP_DTYPES[amp]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def grad_scaler_for(device: torch.device, amp: str) -> Optional[torch.amp.GradScaler]:
    """The loss scaler of a resolved --amp value: a GradScaler for fp16 (whose small range underflows small
    gradients without one), None otherwise (bf16 has float32's range)."""
    return torch.amp.GradScaler(device.type) if amp == "fp16" else None


def resolve_tf32(tf32: bool, device: torch.device) -> bool:
    """Whether TF32 is to run on `device`: asked for, and a CUDA device of compute capability >= 8."""
    return bool(tf32) and device.type == "cuda" and cuda_capability(device)[0] >= 8


def set_tf32(enabled: bool) -> None:
    """TF32 on or off for CUDA's float32 matrix products (cuBLAS) and convolutions (cuDNN). The legacy flags, not
    the `fp32_precision` ones: reading either kind stays valid after setting these, not after mixing them."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def apply_tf32(tf32: bool, device: torch.device) -> bool:
    """Set TF32 for a CUDA device as `--tf32` and the device allow; returns whether it is on. On other devices
    nothing is touched (the flags reach CUDA only) and False is returned."""
    if device.type != "cuda":
        return False
    enabled = resolve_tf32(tf32, device)
    set_tf32(enabled)
    return enabled


def resolve_precision(args, device: torch.device) -> None:
    """Resolve `args.amp` and `args.tf32` for `device` in place, so that args.yaml records what runs, and set TF32;
    SystemExit for a precision the device cannot run natively (bf16 on a V100). The scripts then take their loss
    scaler from `grad_scaler_for(device, args.amp)`."""
    try:
        args.amp = resolve_amp(args.amp, device)
    except ValueError as err:  # before any work: the run cannot use this precision here
        raise SystemExit(f"error: {err}") from err
    args.tf32 = apply_tf32(getattr(args, "tf32", True), device)
