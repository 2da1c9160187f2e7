"""Shared fixtures: a tiny labelled image folder and helpers to run the scripts as a user would."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config) -> None:
    """Under pytest-xdist (scripts/test.sh), each worker's torch gets its share of the cores, not all of them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(scope="session")
def tiny_imagefolder(tmp_path_factory) -> Path:
    """train/ and val/ with 2 classes of 32x32 RGB images whose class is visible (bright or dark)."""
    root = tmp_path_factory.mktemp("tiny_imagefolder")
    rng = np.random.default_rng(0)
    for split, count in (("train", 16), ("val", 4)):
        for label, name in enumerate(("dark", "bright")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 128, size=(32, 32, 3)) + 100 * label
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture
def shallow_models(monkeypatch) -> None:
    """Scripts run in this process build their models one block deep (widths and options unchanged)."""
    import main_pretrain
    import engine_finetune
    from util.registry import create_model, pretrain_models

    def capped(name, **kwargs):
        extra = {"decoder_depth": 1} if name in pretrain_models() else {}
        return create_model(name, **{**kwargs, "depth": 1, **extra})

    monkeypatch.setattr(main_pretrain, "create_model", capped)
    monkeypatch.setattr(engine_finetune, "create_model", capped)


def run_script(args: list[str], *, torchrun: int = 0, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a repository script in a fresh process on the CPU; returns the completed process (text output)."""
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(torchrun), "--master_port", str(_free_port())]
    result = finish_script(start_script([*launcher, *args]), timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def start_script(command: list[str]) -> subprocess.Popen:
    """Start `command` in the repository on the CPU, one thread, in its own session (so that a timeout kills
    torchrun's workers too, not just the launcher)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish_script(process: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    """Wait for a started script; past `timeout` it is killed and the output so far says where it hung."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        command = " ".join(map(str, process.args))
        raise AssertionError(f"{command} still running after {timeout} s:\n{stdout[-3000:]}\n{stderr[-6000:]}") from None
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
