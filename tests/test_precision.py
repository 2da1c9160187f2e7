"""The precision policy (util/precision.py) on GPUs that are not here: `--amp auto` and TF32 by compute capability,
with the device's properties mocked; and the scripts' use of it (the GradScaler that fp16 needs)."""
import argparse
from pathlib import Path

import pytest
import torch
import yaml

import main_finetune
import main_linprobe
import main_pretrain
import engine_finetune
import util.precision
from tools import benchmark
from util.config import parse_with_config
from util.precision import apply_tf32, grad_scaler_for, resolve_amp, resolve_precision, resolve_tf32

CUDA = torch.device("cuda")


@pytest.fixture
def mocked_gpu(monkeypatch):
    """`mocked_gpu(major, minor)` makes torch report a CUDA GPU of that compute capability. is_bf16_supported says
    True whatever the capability, as torch's own does on sm70 (through emulation), so that nothing may rely on it."""
    def mock(major: int, minor: int = 0) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"mocked sm{major}{minor}")
    return mock


@pytest.fixture
def tf32_flags():
    """The two process-wide TF32 flags, put back as they were after the test."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("capability,expected", [
    ((7, 0), "fp16"),  # V100: fp16 tensor cores, no bf16
    ((7, 5), "fp16"),  # T4
    ((8, 0), "bf16"),  # A100
    ((8, 6), "bf16"),  # A10, RTX 30xx
    ((9, 0), "bf16"),  # H100, H200
    ((10, 0), "bf16"),  # B200
    ((6, 0), "none"),  # P100: no tensor cores
])
def test_amp_auto_follows_the_compute_capability(mocked_gpu, capability, expected):
    mocked_gpu(*capability)
    assert resolve_amp("auto", CUDA) == expected
    assert resolve_amp("auto", torch.device("cuda", 1)) == expected
    assert [resolve_amp(amp, CUDA) for amp in ("fp16", "none")] == ["fp16", "none"]  # as given
    if capability[0] >= 8:
        assert resolve_amp("bf16", CUDA) == "bf16"
    else:  # emulated there: refused, naming the fix
        with pytest.raises(ValueError, match=r"--amp bf16: the GPU mocked sm\d+ \(compute capability \d\.\d\) has no bf16 "
                                             r"tensor cores.*Use --amp auto"):
            resolve_amp("bf16", CUDA)


@pytest.mark.parametrize("capability", [(7, 0), (8, 0), (9, 0)])
def test_fp16_and_only_fp16_gets_a_grad_scaler(mocked_gpu, capability):
    """On a mocked V100 auto means fp16 with an enabled GradScaler; on sm80/sm90 bf16 without one."""
    mocked_gpu(*capability)
    amp = resolve_amp("auto", CUDA)
    scaler = grad_scaler_for(CUDA, amp)
    if capability[0] == 7:
        assert amp == "fp16" and isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()
    else:
        assert amp == "bf16" and scaler is None
    assert grad_scaler_for(CUDA, "none") is None


def test_a_cuda_device_without_cuda_resolves_to_fp32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_amp("auto", CUDA) == "none" and not resolve_tf32(True, CUDA)


@pytest.mark.parametrize("capability,flag,expected", [
    ((8, 0), True, True), ((8, 6), True, True), ((9, 0), True, True),
    ((7, 0), True, False), ((7, 5), True, False),
    ((8, 0), False, False), ((9, 0), False, False),
])
def test_tf32_is_on_for_fp32_from_sm80_unless_turned_off(mocked_gpu, tf32_flags, capability, flag, expected):
    mocked_gpu(*capability)
    for before in (True, False):  # set either way, whatever the state before
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = before
        assert apply_tf32(flag, CUDA) is expected
        assert tf32_flags() == (expected, expected)


def test_tf32_changes_nothing_on_the_cpu(tf32_flags):
    state = (torch.get_float32_matmul_precision(), torch.backends.mkldnn.matmul.fp32_precision)
    for flags in ((True, False), (False, True)):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
        assert apply_tf32(True, torch.device("cpu")) is False
        assert tf32_flags() == flags
    assert (torch.get_float32_matmul_precision(), torch.backends.mkldnn.matmul.fp32_precision) == state


@pytest.mark.parametrize("capability,amp,tf32,expected", [
    ((7, 0), "auto", True, ("fp16", False)),
    ((8, 0), "auto", True, ("bf16", True)),
    ((9, 0), "auto", False, ("bf16", False)),
    ((9, 0), "none", True, ("none", True)),
])
def test_args_record_the_precision_that_runs(mocked_gpu, tf32_flags, capability, amp, tf32, expected):
    mocked_gpu(*capability)
    args = argparse.Namespace(amp=amp, tf32=tf32)
    resolve_precision(args, CUDA)
    assert (args.amp, args.tf32) == expected and tf32_flags() == (expected[1], expected[1])


@pytest.mark.parametrize("module", [main_pretrain, main_finetune, main_linprobe])
def test_every_script_has_the_tf32_flag(module):
    parser = module.get_args_parser()
    assert parser.parse_args(["--data_path", "x"]).tf32 is True
    assert parser.parse_args(["--data_path", "x", "--tf32", "false"]).tf32 is False


class _Stop(Exception):
    pass


SCRIPTS = {
    "pretrain": (main_pretrain, main_pretrain, ["--model", "mae_vit_tiny_patch4", "--batch_size", "8", "--vis_freq", "0"]),
    "finetune": (main_finetune, engine_finetune, ["--model", "vit_tiny_patch4", "--batch_size", "4"]),
    "linprobe": (main_linprobe, engine_finetune, ["--model", "vit_tiny_patch4", "--batch_size", "4"]),
}


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_scripts_train_fp16_with_a_grad_scaler_when_auto_resolves_to_it(script, tiny_imagefolder, tmp_path, shallow_models,
                                                                         monkeypatch):
    """Each script resolves --amp through util.precision and hands its training loop a GradScaler when that gives
    fp16 (here what resolve_amp answers for a V100, as tested above; the run itself stays on the CPU)."""
    module, loop_owner, flags = SCRIPTS[script]
    real_resolve = util.precision.resolve_amp
    monkeypatch.setattr(util.precision, "resolve_amp", lambda amp, device: "fp16" if amp == "auto" else real_resolve(amp, device))
    scalers = []

    def first_epoch(*args, **kwargs):
        scalers.extend(a for a in args if isinstance(a, torch.amp.GradScaler))
        raise _Stop

    monkeypatch.setattr(loop_owner, "train_one_epoch", first_epoch)
    args = parse_with_config(module.get_args_parser(), [
        "--data_path", str(tiny_imagefolder), "--input_size", "32", "--epochs", "1", "--warmup_epochs", "0",
        "--num_workers", "0", "--device", "cpu", "--amp", "auto", "--output_dir", str(tmp_path), *flags])
    with pytest.raises(_Stop):
        module.main(args)
    assert len(scalers) == 1 and scalers[0].is_enabled()
    saved = yaml.safe_load((tmp_path / "args.yaml").read_text())
    assert (saved["amp"], saved["tf32"]) == ("fp16", False)  # what ran: no TF32 on a CPU


def test_benchmark_takes_the_tf32_peak_from_the_datasheet(mocked_gpu, monkeypatch):
    mocked_gpu(9, 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert benchmark.default_peak_tflops(CUDA, "tf32") == (494.5, "datasheet H100 tf32 dense")
    assert benchmark.default_peak_tflops(CUDA, "fp32")[0] == 67.0


PRETRAIN_PRESETS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("**/pretrain_*.yaml"))


@pytest.mark.parametrize("capability,amp,scaled", [((7, 0), "fp16", True), ((8, 0), "bf16", False)], ids=["V100", "A100"])
def test_every_pretraining_preset_takes_the_precision_of_the_hardware(mocked_gpu, tf32_flags, capability, amp, scaled):
    """The papers trained on V100s: every pre-training preset must run there in fp16 with a GradScaler and in bf16 on
    an A100, not force one precision on both; an explicit --amp bf16 is refused on the V100."""
    mocked_gpu(*capability)
    assert len(PRETRAIN_PRESETS) > 30
    for preset in PRETRAIN_PRESETS:
        args = parse_with_config(main_pretrain.get_args_parser(), ["--config", str(preset)])
        resolve_precision(args, CUDA)
        assert args.amp == amp, preset.name
        assert isinstance(grad_scaler_for(CUDA, args.amp), torch.amp.GradScaler) == scaled, preset.name
    bf16 = parse_with_config(main_pretrain.get_args_parser(), ["--config", str(PRETRAIN_PRESETS[0]), "--amp", "bf16"])
    if scaled:
        with pytest.raises(SystemExit, match="error: --amp bf16: the GPU mocked sm70"):
            resolve_precision(bf16, CUDA)
    else:
        resolve_precision(bf16, CUDA)
        assert bf16.amp == "bf16"
