"""main_pretrain.py with one injected fault, for tests/test_faults.py; models are one block deep (as conftest's
shallow_models) so that the runs stay short.

    python tests/fault_worker.py FAULT N [main_pretrain.py flags]

With $RANK_FOLDERS set, rank R runs in $RANK_FOLDERS/rankR, so that a relative --output_dir is a folder of its
own on every rank (per-node disks). FAULT acts on rank $FAULT_RANK (default 0), and under torchrun only in the first attempt (not after a restart):
    none             no fault (the uninterrupted reference)
    kill_at_forward  SIGKILL this process right after its N-th forward pass: mid-step, before backward and step
    stop_at_forward  SIGSTOP it there instead: a hung rank (the test kills it)
    kill_in_save     SIGKILL during the N-th checkpoint write, half of its bytes on disk
    term_at_step     SIGTERM to this process at its N-th training step (any method): it saves inside the epoch and stops
    usr2_at_step     SIGUSR2 there instead (submitit's pre-emption and time-limit signal)
    kill_after_mid_save  SIGKILL right after the N-th checkpoint written inside an epoch
    nan_at_forward   the loss and its terms are NaN from the N-th forward pass on
    bad_image        the N-th image read is refused (BadImageError, as for a truncated file)
    oom_at_forward   the N-th forward pass runs out of memory (torch.OutOfMemoryError)
    unwritable_save  the N-th checkpoint write finds its folder unwritable (EACCES)
"""
import errno
import io
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import engine_pretrain
import main_pretrain
import models_mae
import util.checkpoint
import util.datasets
from util.config import parse_with_config
from util.dist import read_launcher_env
from util.registry import create_model


def one_block_deep(name: str, **kwargs):
    return create_model(name, **{**kwargs, "depth": 1, "decoder_depth": 1})


def signal_at_forward(n: int, signum: int) -> None:
    original = models_mae.MaskedAutoencoderViT.forward
    calls = 0

    def forward(self, imgs, noise=None):
        nonlocal calls
        out = original(self, imgs, noise)
        calls += 1
        if calls == n:
            os.kill(os.getpid(), signum)
        return out

    models_mae.MaskedAutoencoderViT.forward = forward


def signal_at_step(n: int, signum: int) -> None:
    """`signum` to this process right after its n-th training step's forward (1-based), whatever the method."""
    original = engine_pretrain.PretrainTask.forward
    calls = 0

    def forward(self, *args, **kwargs):
        nonlocal calls
        out = original(self, *args, **kwargs)
        calls += 1
        if calls == n:
            os.kill(os.getpid(), signum)
        return out

    engine_pretrain.PretrainTask.forward = forward


def kill_after_mid_save(n: int) -> None:
    original = util.checkpoint.RunState.save_mid_epoch
    calls = 0

    def save(self, *args, **kwargs):
        nonlocal calls
        original(self, *args, **kwargs)
        calls += 1
        if calls == n:
            os.kill(os.getpid(), signal.SIGKILL)

    util.checkpoint.RunState.save_mid_epoch = save


def paused_main(args):
    """main_pretrain.main for a SLURM job that pauses once, in its first run, right after training forward
    $PAUSE_AT (1-based): it writes output_dir/paused and waits for output_dir/go, so that a test can signal the
    job at a known step (tests/test_slurm.py). Submitted with PYTHONPATH holding tests/."""
    if os.environ.get("SLURM_RESTART_COUNT", "0") == "0":
        original, calls, out = engine_pretrain.PretrainTask.forward, 0, Path(args.output_dir)

        def forward(self, *forward_args, **kwargs):
            nonlocal calls
            result = original(self, *forward_args, **kwargs)
            calls += 1
            if calls == int(os.environ["PAUSE_AT"]):
                (out / "paused").touch()
                while not (out / "go").exists():
                    time.sleep(0.05)
            return result

        engine_pretrain.PretrainTask.forward = forward
    return main_pretrain.main(args)


def poisoned_forward(is_poisoned: Callable[[int], bool]) -> Callable:
    """MAE's forward whose loss and terms are NaN at the calls (1-based) for which `is_poisoned(call)` holds."""
    original = models_mae.MaskedAutoencoderViT.forward
    calls = 0

    def forward(self, imgs, noise=None):
        nonlocal calls
        calls += 1
        out = original(self, imgs, noise)
        if not is_poisoned(calls):
            return out
        nan = torch.tensor(float("nan"))
        return models_mae.PretrainOutput(out.loss * nan, {k: v * nan for k, v in out.terms.items()}, out.features)

    return forward


def kill_in_save(n: int) -> None:
    original = torch.save
    calls = 0

    def save(obj, f, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls < n:
            return original(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        original(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save


def fail_at_call(owner, name: str, n: int, error: Callable[[], BaseException]) -> None:
    """`owner.name` raises `error()` at its n-th call (1-based) and works as before otherwise."""
    original = getattr(owner, name)
    calls = 0

    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == n:
            raise error()
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def refused_image() -> BaseException:
    return util.datasets.BadImageError.for_file("train/dark/003.png", OSError("image file is truncated (5 bytes not processed)"))


def out_of_memory() -> BaseException:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by tests/fault_worker.py)")


def unwritable() -> BaseException:
    return PermissionError(errno.EACCES, os.strerror(errno.EACCES))


if __name__ == "__main__":
    fault, n = sys.argv[1], int(sys.argv[2])
    main_pretrain.create_model = one_block_deep
    if "RANK_FOLDERS" in os.environ:
        os.chdir(os.path.join(os.environ["RANK_FOLDERS"], f"rank{read_launcher_env().rank}"))
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if first_attempt and read_launcher_env().rank == int(os.environ.get("FAULT_RANK", "0")):
        if fault == "kill_at_forward":
            signal_at_forward(n, signal.SIGKILL)
        elif fault == "stop_at_forward":
            signal_at_forward(n, signal.SIGSTOP)
        elif fault == "term_at_step":
            signal_at_step(n, signal.SIGTERM)
        elif fault == "usr2_at_step":
            signal_at_step(n, signal.SIGUSR2)
        elif fault == "kill_after_mid_save":
            kill_after_mid_save(n)
        elif fault == "kill_in_save":
            kill_in_save(n)
        elif fault == "nan_at_forward":
            models_mae.MaskedAutoencoderViT.forward = poisoned_forward(lambda call: call >= n)
        elif fault == "bad_image":
            fail_at_call(util.datasets.SeededDataset, "__getitem__", n, refused_image)
        elif fault == "oom_at_forward":
            fail_at_call(models_mae.MaskedAutoencoderViT, "forward", n, out_of_memory)
        elif fault == "unwritable_save":
            fail_at_call(util.checkpoint.tempfile, "mkstemp", n, unwritable)
        elif fault != "none":
            raise SystemExit(f"unknown fault {fault!r}")
    main_pretrain.main(parse_with_config(main_pretrain.get_args_parser(), sys.argv[3:]))
