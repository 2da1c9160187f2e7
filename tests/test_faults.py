"""One test per fault of docs/RELIABILITY.md: each injects its fault into a tiny pre-training run on the CPU and
fails if the promise is broken. Runs that must die (kill -9, a dead or hung rank) are subprocesses running
tests/fault_worker.py; the others call main_pretrain.main here, with one-block models (shallow_models)."""
import ast
import errno
import io
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import ROOT, _free_port, run_script
from fault_worker import poisoned_forward
from test_training import assert_same_weights, read_log

import main_finetune
import main_pretrain
import models_mae
from engine_pretrain import train_one_epoch
from util.checkpoint import load_checkpoint, save_atomic
from util.config import args_to_dict, parse_with_config
from util.datasets import BadImageError
from util.metrics import NonFiniteLossError, NonFiniteStepSkipper
from util.registry import create_model

# 32 images / batch 8 = 4 steps an epoch; forward call k (1-based) is step (k - 1) % 4 of epoch (k - 1) // 4.
RUN = {"model": "mae_vit_tiny_patch4", "input_size": 16, "batch_size": 8, "epochs": 2, "warmup_epochs": 1,
       "blr": 1e-3, "num_workers": 0, "amp": "none", "save_freq": 0, "vis_freq": 0, "print_freq": 2, "seed": 3,
       "online_probe": "false", "knn_freq": 0, "device": "cpu"}


def flags(data: Path, out: Path, **overrides) -> list[str]:
    values = {**RUN, "data_path": data, "output_dir": out, **overrides}
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def pretrain_here(data: Path, out: Path, **overrides) -> nn.Module:
    """main_pretrain.main in this process (use with the shallow_models fixture)."""
    return main_pretrain.main(parse_with_config(main_pretrain.get_args_parser(), flags(data, out, **overrides)))


def epochs_logged(out: Path) -> list[int]:
    return [record["epoch"] for record in read_log(out)]


def last_checkpoint(out: Path) -> dict:
    return load_checkpoint(out / "checkpoint-last.pth")


def temp_files(out: Path) -> list[Path]:
    return list(out.glob(".checkpoint-*.tmp"))


def poison_forward(monkeypatch, calls: set[int]) -> None:
    """MAE's loss and terms turn NaN at these forward calls (1-based)."""
    monkeypatch.setattr(models_mae.MaskedAutoencoderViT, "forward", poisoned_forward(lambda call: call in calls))


@pytest.fixture(scope="module")
def uninterrupted(tiny_imagefolder, tmp_path_factory) -> dict[str, torch.Tensor]:
    """Final weights of the fault worker's run without a fault."""
    out = tmp_path_factory.mktemp("uninterrupted")
    run_script(["tests/fault_worker.py", "none", "0", *flags(tiny_imagefolder, out)])
    return last_checkpoint(out)["model"]


# ---------------------------------------------------------------- 1. kill -9


@pytest.mark.slow
@pytest.mark.parametrize("fault,n", [("kill_at_forward", 6), ("kill_in_save", 2)])
def test_kill_9_and_the_same_command_resumes_to_the_uninterrupted_weights(fault, n, uninterrupted, tiny_imagefolder, tmp_path):
    """Forward 6 is step 1 of epoch 1, between forward and optimizer step. Save 2 is checkpoint-1.pth, the final
    epoch's kept file, killed half-way; checkpoint-last.pth would have become a hard link to it."""
    killed = run_script(["tests/fault_worker.py", fault, str(n), *flags(tiny_imagefolder, tmp_path)], check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert last_checkpoint(tmp_path)["epoch"] == 0  # the last complete checkpoint, whole
    assert len(temp_files(tmp_path)) == (fault == "kill_in_save")  # the partial write never took a checkpoint's name
    if fault == "kill_in_save":
        assert not (tmp_path / "checkpoint-1.pth").exists()
        assert epochs_logged(tmp_path) == [0, 1]  # epoch 1's line precedes its checkpoint: the restart drops it
    else:
        assert epochs_logged(tmp_path) == [0]

    restarted = run_script(["tests/fault_worker.py", "none", "0", *flags(tiny_imagefolder, tmp_path)])
    assert "(epoch 0 done)" in restarted.stdout
    assert epochs_logged(tmp_path) == [0, 1]
    assert not temp_files(tmp_path)
    assert_same_weights(last_checkpoint(tmp_path)["model"], uninterrupted)


# ---------------------------------------------------------------- 2. non-finite loss


class _LinearRegression(nn.Module):
    """The engine's task interface on a toy model: a batch whose targets hold a NaN has a NaN loss."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.linear = nn.Linear(3, 1)

    def forward(self, x, y, noise=None):
        loss = ((self.linear(x).squeeze(1) - y) ** 2).mean()
        return loss, {"mse": loss.detach()}


def _train(batches: list, accum_iter: int, skipper: NonFiniteStepSkipper) -> tuple[nn.Module, dict]:
    task = _LinearRegression()
    optimizer = torch.optim.AdamW(task.parameters(), lr=0.1)
    args = Namespace(accum_iter=accum_iter, print_freq=100, amp="none", clip_grad=None, lr=0.1, min_lr=0.1,
                     warmup_epochs=0, epochs=1)  # a constant lr: skipping a step changes nothing else
    stats = train_one_epoch(task, batches, optimizer, torch.device("cpu"), 0, None, args, nan_skips=skipper)
    return task, stats


def test_non_finite_steps_are_skipped_counted_and_then_stop(shallow_models, tiny_imagefolder, tmp_path, monkeypatch):
    """The stop policy (the default) is tested in test_training.py; this is --nan_policy skip."""
    generator = torch.Generator().manual_seed(1)
    good = [(torch.randn(4, 3, generator=generator), torch.randn(4, generator=generator)) for _ in range(3)]
    bad = (good[0][0], torch.tensor([0.0, float("nan"), 0.0, 0.0]))
    # A skipped step is as if its batch (with accumulation: its whole window) had never been there.
    for accum_iter, poisoned, clean in ((1, [good[0], bad, good[1], good[2]], good),
                                        (2, [good[0], bad, good[1], good[2]], good[1:])):
        skipped, stats = _train(poisoned, accum_iter, NonFiniteStepSkipper(max_skips=1))
        reference, _ = _train(clean, accum_iter, NonFiniteStepSkipper(max_skips=1))
        assert_same_weights(skipped.state_dict(), reference.state_dict())
        assert stats["nan_skips"] == 1 and math.isfinite(stats["mse"])
    with pytest.raises(NonFiniteLossError, match=r"\['loss', 'mse'\] at step 3 of epoch 0, after 1 skipped"):
        _train([good[0], bad, good[1], bad], 1, NonFiniteStepSkipper(max_skips=1))

    # End to end: forwards 2 and 6 (step 1 of each epoch) are skipped and logged; the run completes.
    poison_forward(monkeypatch, {2, 6})
    pretrain_here(tiny_imagefolder, tmp_path / "skips", nan_policy="skip", max_nan_skips=2)
    assert [record["train_nan_skips"] for record in read_log(tmp_path / "skips")] == [1, 1]
    checkpoint = last_checkpoint(tmp_path / "skips")
    assert checkpoint["nan_skips"] == 2 and all(torch.isfinite(v).all() for v in checkpoint["model"].values())
    # Three in a row in epoch 1, two allowed: the third stops the run naming it; epoch 0's checkpoint is intact.
    poison_forward(monkeypatch, {6, 7, 8})
    with pytest.raises(NonFiniteLossError, match=r"\['loss', 'rec'\] at step 3 of epoch 1, after 2 skipped optimizer steps"):
        pretrain_here(tiny_imagefolder, tmp_path / "stops", nan_policy="skip", max_nan_skips=2)
    assert epochs_logged(tmp_path / "stops") == [0] and last_checkpoint(tmp_path / "stops")["epoch"] == 0


# ---------------------------------------------------------------- 3. bad image files


@pytest.fixture
def bad_image_folder(tiny_imagefolder, tmp_path) -> tuple[Path, list[Path]]:
    """tiny_imagefolder's 32 training images, four of them broken in different ways."""
    data = tmp_path / "data"
    shutil.copytree(tiny_imagefolder / "train", data / "train")
    dark, bright = sorted((data / "train" / "dark").iterdir()), sorted((data / "train" / "bright").iterdir())
    truncated, empty, not_an_image, corrupt = bright[3], bright[7], dark[5], dark[11]
    truncated.write_bytes(truncated.read_bytes()[:120])
    empty.write_bytes(b"")
    not_an_image.write_text("a text file named .png")
    damaged = bytearray(corrupt.read_bytes())
    damaged[150:400] = bytes(250)  # zeroed compressed data: zlib fails mid-image
    corrupt.write_bytes(bytes(damaged))
    return data, [truncated, empty, not_an_image, corrupt]


def test_bad_image_files_stop_the_run_naming_them_or_are_skipped_and_counted(bad_image_folder, shallow_models, tmp_path, capfd):
    data, bad_files = bad_image_folder
    with pytest.raises(BadImageError) as error:  # raised in a DataLoader worker, re-raised here
        pretrain_here(data, tmp_path / "default", num_workers=2)
    assert any(str(path) in str(error.value) for path in bad_files) and "--skip_bad_images" in str(error.value)
    assert not (tmp_path / "default" / "checkpoint-last.pth").exists()
    capfd.readouterr()

    with_workers = pretrain_here(data, tmp_path / "skip", num_workers=2, skip_bad_images="true")
    log = read_log(tmp_path / "skip")
    # every epoch reads all 32 images, 4 of them bad, in 4 full steps
    assert [(r["epoch"], r["bad_images_replaced"], r["images_seen"]) for r in log] == [(0, 4, 32), (1, 4, 64)]
    reported = capfd.readouterr().err
    for path in bad_files:
        assert reported.count(f"skipping {path} ") == 1, reported  # once, though each epoch's workers are new
    # the replacement depends on the index only: without workers, the same weights
    without_workers = pretrain_here(data, tmp_path / "skip0", num_workers=0, skip_bad_images="true")
    assert_same_weights(with_workers.state_dict(), without_workers.state_dict())
    assert [r["bad_images_replaced"] for r in read_log(tmp_path / "skip0")] == [4, 4]


# ---------------------------------------------------------------- 4. full disk, read-only folder


class _DiskWithRoom(io.RawIOBase):
    """Writes go to `file` until `room` bytes are used, then fail as on a full disk (errno ENOSPC)."""

    def __init__(self, file, room: int):
        super().__init__()
        self.file, self.room = file, room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.room:
            self.file.write(bytes(data[: self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)


@pytest.mark.parametrize("failure", ["disk_full", "read_only"])
def test_full_disk_or_read_only_folder_stops_saying_so_and_keeps_the_checkpoint(failure, shallow_models, tiny_imagefolder,
                                                                                tmp_path, monkeypatch):
    """The second save (epoch 1's checkpoint-last.pth) fails: ENOSPC part-way through torch.save's writes (which torch reports as a
    RuntimeError whose context is the OSError, as on a real full disk), or EROFS creating the temp file."""
    import util.checkpoint

    saves = 0
    real_save, real_mkstemp = torch.save, util.checkpoint.tempfile.mkstemp

    def save(obj, f, *args, **kwargs):
        nonlocal saves
        saves += 1
        return real_save(obj, _DiskWithRoom(f, 4096) if saves == 2 else f, *args, **kwargs)

    def mkstemp(*args, **kwargs):
        nonlocal saves
        saves += 1
        if saves == 2:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_mkstemp(*args, **kwargs)

    if failure == "disk_full":
        monkeypatch.setattr(torch, "save", save)
    else:
        monkeypatch.setattr(util.checkpoint.tempfile, "mkstemp", mkstemp)
    with pytest.raises(OSError) as error:
        pretrain_here(tiny_imagefolder, tmp_path, epochs=3)
    expected = {"disk_full": (errno.ENOSPC, "the disk is full"), "read_only": (errno.EROFS, "read-only file system")}[failure]
    assert error.value.errno == expected[0] and expected[1] in str(error.value)
    assert "checkpoint-last.pth" in str(error.value) and "kept" in str(error.value)
    checkpoint = last_checkpoint(tmp_path)  # the previous one, complete and loadable
    assert checkpoint["epoch"] == 0 and not temp_files(tmp_path)

    # space freed (only the second write failed): the same command resumes and finishes
    pretrain_here(tiny_imagefolder, tmp_path, epochs=3)
    assert epochs_logged(tmp_path) == [0, 1, 2] and last_checkpoint(tmp_path)["epoch"] == 2


# ---------------------------------------------------------------- 5. untrusted checkpoints


def _torch_load_calls_without_weights_only() -> list[str]:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    offenders = []
    for name in files:
        if not (ROOT / name).is_file():
            continue
        for node in ast.walk(ast.parse((ROOT / name).read_text(), name)):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if not safe:
                    offenders.append(f"{name}:{node.lineno}")
    return offenders


class _RunsCode:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/mim_test_faults_pickle_ran"),))


def test_untrusted_checkpoints_are_refused_and_other_models_named(shallow_models, tiny_imagefolder, tmp_path):
    """Loading a crafted file through load_checkpoint is tested in test_cli_and_checkpoints.py; here every
    torch.load in the code, and --resume of main_pretrain.py."""
    assert _torch_load_calls_without_weights_only() == []

    marker = Path("/tmp/mim_test_faults_pickle_ran")
    marker.unlink(missing_ok=True)
    crafted = tmp_path / "crafted.pth"
    torch.save({"model": _RunsCode(), "epoch": 0}, crafted)
    with pytest.raises(SystemExit, match=f"refusing to load {crafted}.*could run code"):
        pretrain_here(tiny_imagefolder, tmp_path / "a", resume=crafted)
    assert not marker.exists()

    other = create_model("mae_vit_small_patch4", img_size=16, depth=1, decoder_depth=1).state_dict()  # 384 wide, not 192
    ours = create_model("mae_vit_tiny_patch4", img_size=16, depth=1, decoder_depth=1).state_dict()
    first = next(key for key in other if other[key].shape != ours[key].shape)
    save_atomic({"model": other, "epoch": 0}, tmp_path / "other.pth")
    expected = f"shape mismatch at '{first}': checkpoint {tuple(other[first].shape)}, model {tuple(ours[first].shape)}"
    with pytest.raises(SystemExit) as error:
        pretrain_here(tiny_imagefolder, tmp_path / "b", resume=tmp_path / "other.pth")
    assert expected in str(error.value.code)

    whole = (tmp_path / "other.pth").read_bytes()
    for name, content in (("cut.pth", whole[: len(whole) // 2]), ("empty.pth", b""), ("text.pth", b"not a checkpoint\n" * 9)):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"{name} is not a readable checkpoint|refusing to load .*{name}"):
            load_checkpoint(tmp_path / name)


# ---------------------------------------------------------------- 6. bad configuration


def _rejected(module, argv: list[str], capsys) -> str:
    parser = module.get_args_parser()
    with pytest.raises(SystemExit) as exit_info:
        module.validate_args(parse_with_config(parser, argv), parser)
    assert exit_info.value.code != 0
    return capsys.readouterr().err


@pytest.mark.parametrize("module,argv,named", [
    (main_pretrain, ["--model", "mi_mae_vit_tiny_patch4", "--input_size", "32", "--num_masks", "5", "--mask_ratio", "0.75"],
     ["--num_masks 5", "--mask_ratio 0.75"]),
    (main_pretrain, ["--model", "mi_mae_vit_tiny_patch4", "--input_size", "30"], ["--input_size 30", "patch size 4"]),
    (main_pretrain, ["--online_probe", "true", "--batch_size", "1"], ["--online_probe", "--batch_size"]),
    (main_finetune, ["--model", "vit_tiny_patch4", "--mixup", "0.8", "--batch_size", "7"], ["--batch_size must be even", "got 7"]),
], ids=["num_masks_vs_mask_ratio", "input_size_vs_patch", "probe_batch_size", "mixup_batch_size"])
def test_bad_flags_fail_before_any_work_naming_them(module, argv, named, tmp_path, capsys):
    """Unknown YAML keys: test_yaml_sets_defaults_cli_overrides_and_unknown_keys_fail (test_cli_and_checkpoints.py)."""
    message = _rejected(module, [*argv, "--data_path", str(tmp_path)], capsys)
    assert all(part in message for part in named), message


def test_models_that_cannot_be_built_or_resumed_fail_before_training(shallow_models, tiny_imagefolder, tmp_path):
    with pytest.raises(SystemExit, match="--model mae_vit_tiny_patch4 with --input_size 30: .*not divisible by the patch size 4"):
        pretrain_here(tiny_imagefolder, tmp_path / "a", input_size=30)
    assert not (tmp_path / "a" / "log.txt").exists()

    pretrain_here(tiny_imagefolder, tmp_path / "b", epochs=1)
    with pytest.raises(SystemExit, match=r"trained with --mask_ratio 0.75 \(this run: 0.6\)"):
        pretrain_here(tiny_imagefolder, tmp_path / "b", mask_ratio=0.6)
    assert epochs_logged(tmp_path / "b") == [0]
    pretrain_here(tiny_imagefolder, tmp_path / "b", blr=2e-3)  # the schedule may change: epoch 1 is trained
    assert epochs_logged(tmp_path / "b") == [0, 1]

    # every flag reaching the model, a method's own flags included, not only a fixed list
    parser = main_pretrain.get_args_parser()
    base = ["--model", "mi_mae_vit_tiny_patch4", "--input_size", "32", "--data_path", str(tiny_imagefolder)]
    saved = {"args": args_to_dict(parse_with_config(parser, base))}
    for changed, named in ((["--num_masks", "2"], "--num_masks 4 (this run: 2)"), (["--w_min", "1"], "--w_min 10.0"),
                           (["--norm_pix_loss"], "--norm_pix_loss False"), (["--online_probe", "true"], "--online_probe")):
        with pytest.raises(SystemExit, match=named.replace("(", r"\(").replace(")", r"\)")):
            main_pretrain.check_resumable(saved, parse_with_config(parser, [*base, *changed]), Path("x.pth"))
    main_pretrain.check_resumable(saved, parse_with_config(parser, [*base, "--epochs", "800", "--batch_size", "7"]), Path("x.pth"))


# ---------------------------------------------------------------- 7. distributed


def _launch_rank(rank: int, port: int, argv: list[str], fault_rank: int, **env) -> subprocess.Popen:
    """One rank as a cluster scheduler starts it (no torchrun agent to kill the others): RANK/WORLD_SIZE env."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "RANK": str(rank),
           "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "FAULT_RANK": str(fault_rank), **env}
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill_at_forward", "stop_at_forward"])
def test_a_dead_or_hung_rank_makes_the_other_exit_with_an_error_within_the_timeout(fault, tiny_imagefolder, tmp_path):
    """Rank 1 dies (SIGKILL) or hangs (SIGSTOP) mid-step in epoch 1; rank 0, waiting in DDP's all-reduce, must
    fail on its own within --dist_timeout instead of hanging forever."""
    timeout = 20
    argv = ["tests/fault_worker.py", fault, "6", *flags(tiny_imagefolder, tmp_path, batch_size=4, dist_timeout=timeout)]
    port = _free_port()
    ranks = [_launch_rank(rank, port, argv, fault_rank=1) for rank in (0, 1)]
    try:
        while ranks[1].poll() is None and not _stopped(ranks[1].pid):
            time.sleep(0.2)
        assert ranks[1].returncode in (None, -signal.SIGKILL)
        _, err = ranks[0].communicate(timeout=timeout + 30)  # TimeoutExpired here: rank 0 hangs
    finally:
        for process in ranks:
            process.kill()
            process.wait()
    assert ranks[0].returncode not in (0, None)
    # gloo's own words: a dead peer closes its sockets at once; a hung one leaves only the timeout to end the wait,
    # which gloo reports in one of two ways (seen under load: "Application timeout caused pair closure")
    expected = (["Connection"] if fault == "kill_at_forward"
                else [f"Timed out waiting {timeout * 1000}ms", "Application timeout caused pair closure"])
    assert any(words in err for words in expected), err[-2000:]
    assert last_checkpoint(tmp_path)["epoch"] == 0


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


@pytest.mark.slow
def test_torchrun_restarts_after_a_rank_dies_and_resumes_from_the_last_checkpoint(uninterrupted, tiny_imagefolder, tmp_path,
                                                                                  monkeypatch):
    """2 ranks x batch 4 see the batches of 1 process x batch 8: the same weights up to float error."""
    monkeypatch.setenv("FAULT_RANK", "1")
    result = run_script(["--max-restarts", "1", "tests/fault_worker.py", "kill_at_forward", "6",
                         *flags(tiny_imagefolder, tmp_path, batch_size=4, dist_timeout=20)], torchrun=2)
    assert "(epoch 0 done)" in result.stdout  # the second attempt resumed from epoch 0's checkpoint
    assert epochs_logged(tmp_path) == [0, 1]
    assert_same_weights(last_checkpoint(tmp_path)["model"], uninterrupted, atol=2e-5)


# Each fault hits one rank of two launched as a scheduler starts them (no torchrun agent to end the other):
# (fault, forward/read/save count at which it strikes, the rank it strikes, what every rank's output must name).
ONE_RANK_FAULTS = {
    "nan_at_forward": (6, 1, "non-finite loss term(s) ['loss', 'rec'] on rank 1 of 2"),
    "bad_image": (10, 1, "cannot read image train/dark/003.png"),
    "oom_at_forward": (3, 1, "OutOfMemoryError: CUDA out of memory"),
    "unwritable_save": (1, 0, "permission denied"),  # only rank 0 writes checkpoints
}


@pytest.mark.slow
@pytest.mark.parametrize("fault", list(ONE_RANK_FAULTS))
def test_a_fault_on_one_rank_stops_every_rank_within_seconds_naming_it(fault, tiny_imagefolder, tmp_path):
    """Whatever stops one rank stops the other within seconds (not --dist_timeout, 300 s here), both exit non-zero,
    and both outputs name the fault and the rank that hit it (util.dist.stop_together; the NaN check is a
    collective, so every rank raises the same error)."""
    count, fault_rank, cause = ONE_RANK_FAULTS[fault]
    argv = ["tests/fault_worker.py", fault, str(count), *flags(tiny_imagefolder, tmp_path, batch_size=4, dist_timeout=300)]
    port = _free_port()
    start = time.monotonic()
    ranks = [_launch_rank(rank, port, argv, fault_rank=fault_rank) for rank in (0, 1)]
    exited: dict[int, float] = {}
    try:
        while len(exited) < 2 and time.monotonic() - start < 120:
            exited.update({rank: time.monotonic() for rank, process in enumerate(ranks)
                           if rank not in exited and process.poll() is not None})
            time.sleep(0.1)
        outputs = [process.communicate(timeout=5) for process in ranks] if len(exited) == 2 else None
    finally:
        for process in ranks:
            process.kill()
            process.wait()
    assert outputs is not None, f"a rank still runs {time.monotonic() - start:.0f} s after the start"
    assert all(process.returncode not in (0, None) for process in ranks)
    assert abs(exited[0] - exited[1]) <= 30, exited
    for rank, (stdout, stderr) in enumerate(outputs):
        output = (stdout + stderr).lower()
        assert cause.lower() in output, f"rank {rank} does not name the fault:\n{stderr[-3000:]}"
        assert f"rank {fault_rank} of 2" in output, f"rank {rank} does not name rank {fault_rank}:\n{stderr[-3000:]}"


@pytest.fixture(scope="module")
def two_epoch_checkpoints(tiny_imagefolder, tmp_path_factory) -> Path:
    """checkpoint-0.pth and checkpoint-1.pth of one process x batch 8 (the one-block models of fault_worker.py)."""
    out = tmp_path_factory.mktemp("two_epochs")
    run_script(["tests/fault_worker.py", "none", "0", *flags(tiny_imagefolder, out, save_freq=1)])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("rank1_sees", ["the same file", "no file", "an older file"])
def test_rank_0_chooses_the_checkpoint_and_every_rank_resumes_from_it(rank1_sees, two_epoch_checkpoints, tiny_imagefolder,
                                                                      tmp_path):
    """Per-rank output folders (a relative --output_dir under a folder per rank, as per-node disks): rank 0 holds epoch
    0's checkpoint; rank 1 holds the same, none, or epoch 1's. The same file: both resume at epoch 1 and end with
    the weights of the uninterrupted run. Otherwise both stop, naming the path or the epochs each rank read."""
    for rank, source in ((0, "checkpoint-0.pth"), (1, {"the same file": "checkpoint-0.pth", "no file": None,
                                                        "an older file": "checkpoint-1.pth"}[rank1_sees])):
        (tmp_path / f"rank{rank}" / "out").mkdir(parents=True)
        if source is not None:
            shutil.copy(two_epoch_checkpoints / source, tmp_path / f"rank{rank}" / "out" / "checkpoint-last.pth")
    argv = ["tests/fault_worker.py", "none", "0", *flags(tiny_imagefolder, Path("out"), batch_size=4, dist_timeout=60)]
    port = _free_port()
    ranks = [_launch_rank(rank, port, argv, fault_rank=0, RANK_FOLDERS=str(tmp_path)) for rank in (0, 1)]
    try:
        outputs = [process.communicate(timeout=90) for process in ranks]
    finally:
        for process in ranks:
            process.kill()
            process.wait()
    if rank1_sees == "the same file":
        assert [process.returncode for process in ranks] == [0, 0], outputs[1][1][-3000:]
        assert "resumed from out/checkpoint-last.pth (epoch 0 done)" in outputs[0][0]
        assert epochs_logged(tmp_path / "rank0" / "out") == [1]  # log.txt held no line: only epoch 1 ran
        assert_same_weights(last_checkpoint(tmp_path / "rank0" / "out")["model"],
                            load_checkpoint(two_epoch_checkpoints / "checkpoint-1.pth")["model"], atol=2e-5)
        return
    assert all(process.returncode not in (0, None) for process in ranks)
    expected = {"no file": "rank 1 of 2 cannot read out/checkpoint-last.pth",
                "an older file": "the ranks read different checkpoints at out/checkpoint-last.pth: epochs [0, 1]"}[rank1_sees]
    for rank, (_, stderr) in enumerate(outputs):
        assert expected in stderr, f"rank {rank}:\n{stderr[-3000:]}"
    assert load_checkpoint(tmp_path / "rank0" / "out" / "checkpoint-last.pth")["epoch"] == 0  # nothing written is lost
