"""Whether the installed torch build carries kernels for a CUDA GPU, and which build to install where it does not.

A CUDA wheel of torch holds machine code for a list of GPU architectures (`torch.cuda.get_arch_list()`). The CUDA
13.0 builds (torch 2.14's default wheels) start at sm_75, so on a V100 (sm_70), the GPU of MI-MAE's and MAE's
recipes, the first kernel fails. The CUDA 12.6 builds still carry sm_70. This module picks the build from the
GPUs' compute capabilities, for scripts/setup.sh (`python util/cuda_build.py --pip-index`, which reads
`nvidia-smi`), for every script's start-up (`check_device`, through util.run.resolve_device) and for
tools/check_env.py. It imports torch only inside the functions that need it, so that the set-up can run it
before torch is installed. Never run on a V100 here: the choice is tested on mocked `nvidia-smi` output and
device properties.
"""
import re
import shutil
import subprocess
import sys
from typing import Optional, Sequence

# The oldest architecture of torch's default CUDA wheels, and the index of the builds that still reach back further.
DEFAULT_BUILD_OLDEST = (7, 5)
OLD_GPU_INDEX = "https://download.pytorch.org/whl/cu126"  # CUDA 12.6: sm_50 ... sm_90, V100 (sm_70) included
GPU_CAPABILITIES = {"P100": (6, 0), "V100": (7, 0), "T4": (7, 5), "A100": (8, 0), "A10": (8, 6), "A40": (8, 6),
                    "L4": (8, 9), "L40": (8, 9), "H100": (9, 0), "H200": (9, 0), "B200": (10, 0)}


def parse_gpu(value: str) -> tuple[int, int]:
    """'sm_70', '7.0' or a GPU name ('V100', 'A100', ...) -> (major, minor); ValueError naming what is allowed."""
    text = value.strip()
    if match := re.fullmatch(r"(?:sm_?)?(\d+)(\d)|(\d+)\.(\d)", text, flags=re.IGNORECASE):
        digits = [int(g) for g in match.groups() if g is not None]
        return digits[0], digits[1]
    for name, capability in GPU_CAPABILITIES.items():
        if name.lower() == text.lower():
            return capability
    raise ValueError(f"--gpu {value!r}: give sm_XY (sm_70), a compute capability (7.0) or one of {list(GPU_CAPABILITIES)}")


def runs_on(capability: tuple[int, int], arch_list: Sequence[str]) -> bool:
    """Whether a build with `arch_list` ('sm_80', 'compute_90', ...) runs on a GPU of `capability`: machine code
    for the same major architecture and an equal or older minor one (binary compatible), or PTX of an equal or
    older architecture (compiled for the GPU when loaded)."""
    for arch in arch_list:
        match = re.fullmatch(r"(sm|compute)_(\d+)(\d)[a-z]?", arch)
        if match is None:
            continue
        kind, major, minor = match.group(1), int(match.group(2)), int(match.group(3))
        if kind == "sm" and major == capability[0] and minor <= capability[1]:
            return True
        if kind == "compute" and (major, minor) <= tuple(capability):
            return True
    return False


def pip_index_for(capabilities: Sequence[tuple[int, int]]) -> Optional[str]:
    """The package index whose torch build runs on every one of these GPUs: None (PyPI's default build) unless one
    is older than the default build's oldest architecture."""
    return OLD_GPU_INDEX if any(tuple(c) < DEFAULT_BUILD_OLDEST for c in capabilities) else None


def install_command(capability: tuple[int, int]) -> str:
    index = pip_index_for([capability])
    extra = f" --index-url {index}" if index else ""
    return f"pip install --force-reinstall torch torchvision{extra}  (then pip install -r requirements.txt)"


def sm(capability: tuple[int, int]) -> str:
    return f"sm_{capability[0]}{capability[1]}"


def check_device(device) -> None:
    """Stop, before any work, on a CUDA device whose architecture this torch build has no kernels for, naming the
    install command; nothing to check on other devices."""
    import torch

    if device.type != "cuda":
        return
    capability = tuple(torch.cuda.get_device_capability(device))
    arch_list = torch.cuda.get_arch_list()
    if not runs_on(capability, arch_list):
        raise SystemExit(
            f"error: torch {torch.__version__} (CUDA {torch.version.cuda}) has kernels for {', '.join(arch_list)}, not for "
            f"the GPU {torch.cuda.get_device_name(device)} ({sm(capability)}): its first kernel would fail. Install a "
            f"build that has them: {install_command(capability)}. scripts/setup.sh picks it on such machines; "
            f"tools/check_env.py checks an install")


def nvidia_smi_capabilities() -> list[tuple[int, int]]:
    """The compute capabilities of this machine's GPUs, from nvidia-smi; [] without nvidia-smi or GPUs."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=60, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [parse_gpu(line) for line in out.split() if line.strip()]


if __name__ == "__main__":
    # scripts/setup.sh: print the extra pip arguments of the torch build for this machine's GPUs (empty: the default)
    if sys.argv[1:] != ["--pip-index"]:
        raise SystemExit("usage: python util/cuda_build.py --pip-index")
    index = pip_index_for(nvidia_smi_capabilities())
    print(f"--index-url {index}" if index else "")
