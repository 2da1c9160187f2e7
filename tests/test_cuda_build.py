"""The torch build and the GPU (util/cuda_build.py), on mocked GPUs: the set-up's choice from nvidia-smi's output,
the start-up check of every script, and tools/check_env.py. None of it has run on a V100."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from tools import check_env
from util.cuda_build import OLD_GPU_INDEX, check_device, parse_gpu, pip_index_for, runs_on
from util.run import resolve_device

DEFAULT_BUILD = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]  # torch 2.14.1+cu130's list
CU126_BUILD = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]


@pytest.mark.parametrize("gpu,default_runs,cu126_runs", [
    ("V100", False, True), ("T4", True, True), ("A100", True, True), ("A10", True, True), ("H100", True, True),
    ("B200", True, False), ("sm_70", False, True), ("7.0", False, True), ("8.9", True, True)])
def test_which_build_runs_on_which_gpu(gpu, default_runs, cu126_runs):
    capability = parse_gpu(gpu)
    assert runs_on(capability, DEFAULT_BUILD) == default_runs
    assert runs_on(capability, CU126_BUILD) == cu126_runs
    assert runs_on((9, 0), ["sm_80", "compute_80"])  # PTX of an older architecture is compiled at load
    assert not runs_on((7, 0), ["sm_75", "compute_75"])
    with pytest.raises(ValueError, match="--gpu 'K80'"):
        parse_gpu("K80")


@pytest.mark.parametrize("capabilities,index", [
    ("7.0\n7.0\n", OLD_GPU_INDEX),  # a V100 node
    ("8.0\n8.0\n", ""),  # A100
    ("9.0\n", ""),  # H100
    ("7.5\n", ""),  # T4: the default build's oldest
    (None, ""),  # no nvidia-smi: the CPU
])
def test_the_set_up_picks_the_build_from_nvidia_smi(capabilities, index, tmp_path):
    """scripts/setup.sh installs torch with `python util/cuda_build.py --pip-index`'s arguments first."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if capabilities is not None:
        (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\nprintf '{capabilities}'\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "util/cuda_build.py", "--pip-index"], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == (f"--index-url {index}" if index else "")
    assert pip_index_for([(7, 0), (9, 0)]) == OLD_GPU_INDEX  # one old GPU is enough
    assert 'util/cuda_build.py --pip-index' in (ROOT / "scripts" / "setup.sh").read_text()


def mock_gpu(monkeypatch, capability: tuple[int, int], arch_list: list[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"mocked sm{capability[0]}{capability[1]}")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: arch_list)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_every_script_stops_on_a_gpu_the_build_cannot_run(monkeypatch):
    """util.run.resolve_device, every main script's start-up, refuses a V100 under the default build, naming the
    install command, and lets an A100 (or the V100 under a CUDA 12.6 build) through."""
    mock_gpu(monkeypatch, (7, 0), DEFAULT_BUILD)
    with pytest.raises(SystemExit, match=r"not for the GPU mocked sm70 \(sm_70\).*--index-url https://download.pytorch.org/whl/cu126"):
        resolve_device("cuda")
    mock_gpu(monkeypatch, (7, 0), CU126_BUILD)
    check_device(torch.device("cuda"))
    mock_gpu(monkeypatch, (8, 0), DEFAULT_BUILD)
    check_device(torch.device("cuda"))
    check_device(torch.device("cpu"))


def test_check_env_answers_for_a_gpu_that_is_not_here(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: DEFAULT_BUILD)
    assert check_env.main(["--gpu", "sm_70"]) == 1
    out = capsys.readouterr().out
    assert "GPU sm_70: sm_70, --amp auto -> fp16 with a GradScaler" in out and "has no kernels for it" in out
    assert f"--index-url {OLD_GPU_INDEX}" in out
    assert check_env.main(["--gpu", "A100", "--gpu", "H100"]) == 0
    out = capsys.readouterr().out
    assert "GPU A100: sm_80, --amp auto -> bf16" in out and "GPU H100: sm_90" in out and "install:" not in out
