"""main_pretrain.py with one injected fault, for tests/test_faults.py; models are one block deep (as conftest's
shallow_models) so that the runs stay short.

    python tests/fault_worker.py FAULT N [main_pretrain.py flags]

FAULT acts on rank $FAULT_RANK (default 0), and under torchrun only in the first attempt (not after a restart):
    none             no fault (the uninterrupted reference)
    kill_at_forward  SIGKILL this process right after its N-th forward pass: mid-step, before backward and step
    stop_at_forward  SIGSTOP it there instead: a hung rank (the test kills it)
    kill_in_save     SIGKILL during the N-th checkpoint write, half of its bytes on disk
"""
import io
import os
import signal
import sys
from collections.abc import Callable

import torch

import main_pretrain
import models_mae
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


if __name__ == "__main__":
    fault, n = sys.argv[1], int(sys.argv[2])
    main_pretrain.create_model = one_block_deep
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if first_attempt and read_launcher_env().rank == int(os.environ.get("FAULT_RANK", "0")):
        if fault == "kill_at_forward":
            signal_at_forward(n, signal.SIGKILL)
        elif fault == "stop_at_forward":
            signal_at_forward(n, signal.SIGSTOP)
        elif fault == "kill_in_save":
            kill_in_save(n)
        elif fault != "none":
            raise SystemExit(f"unknown fault {fault!r}")
    main_pretrain.main(parse_with_config(main_pretrain.get_args_parser(), sys.argv[3:]))
