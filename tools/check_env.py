"""What a run will get on this machine, before it spends GPU time: torch and its CUDA build, the GPU architectures the
build has kernels for, the GPUs present, NCCL, what `--amp auto` picks on each GPU, and what to install where the
build cannot run.

    python tools/check_env.py               # this machine
    python tools/check_env.py --gpu V100    # a GPU that is not here (also sm_70 or 7.0), with this install

Exit status 1 when a GPU (present or asked about) cannot run with this torch build.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from util.cuda_build import install_command, parse_gpu, runs_on, sm  # noqa: E402
from util.precision import amp_for_gpu, resolve_amp  # noqa: E402


def gpu_lines(name: str, capability: tuple[int, int], arch_list: list[str]) -> tuple[list[str], bool]:
    """The report of one GPU and whether this build runs on it."""
    ok = runs_on(capability, arch_list)
    amp = amp_for_gpu(capability)
    lines = [f"GPU {name}: {sm(capability)}, --amp auto -> {amp}{' with a GradScaler' if amp == 'fp16' else ''}",
             f"  this torch build: {'runs' if ok else 'has no kernels for it: its first kernel fails'}"]
    if not ok:
        lines.append(f"  install: {install_command(capability)}")
    return lines, ok


def report(gpus: list[tuple[str, tuple[int, int]]]) -> tuple[list[str], bool]:
    arch_list = torch.cuda.get_arch_list()
    lines = [f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'none (CPU-only build)'}",
             f"GPU architectures of this build: {', '.join(arch_list) or 'none'}"]
    if torch.cuda.is_available():
        nccl = torch.cuda.nccl.version() if hasattr(torch.cuda, "nccl") else None
        lines.append(f"NCCL {'.'.join(map(str, nccl)) if isinstance(nccl, tuple) else nccl or 'not available'}")
    all_ok = True
    for name, capability in gpus:
        more, ok = gpu_lines(name, capability, arch_list)
        lines += more
        all_ok &= ok
    if not gpus:
        lines.append(f"no GPU: runs on the CPU, --amp auto -> {resolve_amp('auto', torch.device('cpu'))} on this CPU "
                     f"(bf16 needs AVX-512 BF16 or AMX)")
    return lines, all_ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="append", default=[],
                        help="ask about a GPU that is not here: sm_XY, X.Y or a name (V100, A100, H100, ...); repeatable")
    args = parser.parse_args(argv)
    try:
        gpus = [(value, parse_gpu(value)) for value in args.gpu]
    except ValueError as err:
        parser.error(str(err))
    if not gpus and torch.cuda.is_available():
        gpus = [(torch.cuda.get_device_name(i), tuple(torch.cuda.get_device_capability(i)))
                for i in range(torch.cuda.device_count())]
    lines, ok = report(gpus)
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
