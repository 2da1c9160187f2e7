"""Checkpoints hold plain types only (dicts, tensors, numbers, strings) and load with weights_only=True.

`checkpoint-last.pth` is rewritten atomically every epoch (temp file, fsync, rename), so a crash or a
pre-emption leaves either the previous or the new complete file, and a restart resumes from it.
"""
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

LAST = "checkpoint-last.pth"


def save_atomic(state: dict[str, Any], path: str | Path) -> None:
    """torch.save to a temporary file beside `path`, flush it to disk, then rename over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load on CPU with weights_only=True; a file carrying pickled code is refused, naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"refusing to load {path}: it holds objects other than tensors and plain types "
            f"(weights_only=True). Only load checkpoints you trust; details: {str(err).splitlines()[0]}"
        ) from err


def model_state_from(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model's state dict from our checkpoints or official MAE/DeiT files ('model' or 'state_dict' key)."""
    for key in ("model", "state_dict"):
        if key in checkpoint and isinstance(checkpoint[key], dict):
            return checkpoint[key]
    return checkpoint


def find_resume_checkpoint(args) -> Optional[Path]:
    """`--resume PATH` if given, else `output_dir/checkpoint-last.pth` if present (auto-resume)."""
    if args.resume:
        return Path(args.resume)
    last = Path(args.output_dir) / LAST
    return last if args.auto_resume and last.is_file() else None


def save_training_state(args, epoch: int, state: dict[str, Any]) -> None:
    """Write checkpoint-last.pth, plus checkpoint-<epoch>.pth every --save_freq epochs and at the end."""
    output = Path(args.output_dir)
    state = dict(state, epoch=epoch)
    save_atomic(state, output / LAST)
    if (args.save_freq > 0 and (epoch + 1) % args.save_freq == 0) or epoch + 1 == args.epochs:
        save_atomic(state, output / f"checkpoint-{epoch}.pth")
