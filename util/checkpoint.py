"""Checkpoints hold plain types only (dicts, tensors, numbers, strings) and load with weights_only=True.

Every checkpoint is written atomically (temp file, fsync, rename, fsync of the folder), so a crash, a kill
or a full disk leaves either the previous or the new complete file, and a restart resumes from it.
"""
import errno
import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from util.config import args_to_dict
from util.dist import all_gather_object, broadcast_object, get_rank, get_world_size, is_main_process, raised_on_every_rank

LAST = "checkpoint-last.pth"
# A failed write says why in words: torch.save reports a full disk as a RuntimeError whose context is the OSError.
_WRITE_FAILURES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the output folder is on a read-only file system",
    errno.EACCES: "the output folder is not writable (permission denied)",
    errno.EPERM: "the output folder is not writable (operation not permitted)",
}


def _write_failure(err: BaseException) -> Optional[OSError]:
    """The OSError behind `err` (itself, its cause or its context) whose errno says the disk refuses writes."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in _WRITE_FAILURES:
            return err
        err = err.__cause__ or err.__context__
    return None


def save_atomic(state: dict[str, Any], path: str | Path) -> None:
    """torch.save to a temporary file beside `path`, flush it to disk, then rename over `path`.

    If the disk is full or the folder read-only, raises an OSError (same errno) saying so; `path` keeps its
    previous content and the temporary file is removed.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)  # the rename itself survives a power cut only once the folder is on disk
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        failure = _write_failure(err)
        if failure is None:
            raise
        raise OSError(failure.errno, f"cannot write checkpoint {path}: {_WRITE_FAILURES[failure.errno]} "
                                     f"({failure.strerror}). The checkpoints already there are kept unchanged; free "
                                     f"space or choose another --output_dir, then run the same command to resume") from err


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def link_atomic(source: str | Path, path: str | Path) -> bool:
    """Make `path` a hard link of the complete file `source`: link to a temporary name, then rename over `path`.

    Returns False, leaving `path` as it was, where the file system refuses hard links (some network and FUSE
    mounts); the caller then writes a copy. Every save replaces a name with a new file and never writes into one,
    so the two names can share their bytes.
    """
    source, path = Path(source), Path(path)
    tmp = path.parent / f".{path.name}.link.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        return False
    _fsync_folder(path.parent)
    return True


def remove_stale_temp_files(folder: str | Path) -> None:
    """Delete the temporary files of checkpoint saves that a killed process left behind in `folder`."""
    for stale in Path(folder).glob(".checkpoint-*.pth.*.tmp"):
        stale.unlink(missing_ok=True)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load on CPU with weights_only=True; a file carrying pickled code, or not a checkpoint at all, is refused
    naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only load failed" in str(err).lower():  # torch's refusal of a global outside its allow-list
            detail = next((line.strip() for line in str(err).splitlines() if "Unsupported" in line), str(err).splitlines()[0])
            raise ValueError(
                f"refusing to load {path}: it holds objects other than tensors and plain types, which could run "
                f"code, or is no torch checkpoint at all (weights_only=True). Only load checkpoints you trust; "
                f"torch says: {detail}") from err
        raise _unreadable(path, err) from err
    except (RuntimeError, OSError, EOFError, KeyError, ValueError) as err:  # torch's readers on truncated or foreign bytes
        raise _unreadable(path, err) from err


def _unreadable(path: Path, err: BaseException) -> ValueError:
    detail = (str(err).splitlines() or [""])[0] or type(err).__name__
    return ValueError(f"{path} is not a readable checkpoint (truncated, corrupt or another format): {detail}")


def model_state_from(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model's state dict from our checkpoints or official MAE/DeiT files ('model' or 'state_dict' key)."""
    for key in ("model", "state_dict"):
        if key in checkpoint and isinstance(checkpoint[key], dict):
            return checkpoint[key]
    return checkpoint


def load_matching_state(module: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """module.load_state_dict(state) strictly, but first a ValueError naming the first key whose shape differs
    (with both shapes), or the keys that one side lacks: a checkpoint of another model says what differs.

    Buffers a module lists in `state_added_later` (state introduced after checkpoints of it were written) may be
    missing: they keep the module's initial values, and a note says so."""
    own = module.state_dict()
    for key, value in state.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise ValueError(f"{source}: shape mismatch at {key!r}: checkpoint {tuple(value.shape)}, "
                             f"model {tuple(own[key].shape)}; the checkpoint is of another model or other model flags")
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    added_later = [key for key in missing if key in getattr(module, "state_added_later", ())]
    missing = [key for key in missing if key not in added_later]
    if missing or unexpected:
        raise ValueError(f"{source}: keys differ from the model's: missing {missing[:5]}, unexpected {unexpected[:5]} "
                         f"({len(missing)} and {len(unexpected)} in all); the checkpoint is of another model")
    if added_later:
        print(f"{source}: written before {added_later} existed; they start from their initial values")
    module.load_state_dict(state, strict=not added_later)


def find_resume_checkpoint(args) -> Optional[Path]:
    """`--resume PATH` if given, else `output_dir/checkpoint-last.pth` if present (auto-resume)."""
    if args.resume:
        return Path(args.resume)
    last = Path(args.output_dir) / LAST
    return last if args.auto_resume and last.is_file() else None


def load_resume_checkpoint(args) -> Optional[tuple[Path, dict[str, Any]]]:
    """The checkpoint to resume from and its content, or None for a fresh start. Rank 0 chooses it
    (`find_resume_checkpoint`) and every rank reads rank 0's choice, so that no rank starts afresh while another
    resumes (per-node disks, a stale network-file-system view). A ValueError names a file that is not a readable
    checkpoint. With several ranks, a rank that cannot read the file stops the run naming the path, and ranks that
    read different epochs there stop together naming them."""
    path = broadcast_object(find_resume_checkpoint(args) if is_main_process() else None)
    if path is None:
        return None
    world = get_world_size()
    if world == 1:
        return path, load_checkpoint(path)
    try:
        checkpoint = load_checkpoint(path)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: rank {get_rank()} of {world} cannot read {path}, the checkpoint that rank 0 resumes "
                         f"from: {err}. Every rank reads it: put --output_dir on a file system that every node "
                         f"shares") from err
    epochs = all_gather_object(progress_of(checkpoint))
    if len(set(epochs)) > 1:
        raise raised_on_every_rank(SystemExit(
            f"error: the ranks read different checkpoints at {path}: epochs [{', '.join(epochs)}] in rank order. --output_dir "
            f"must be one folder that every node sees the same (a shared file system, not per-node disks)"))
    return path, checkpoint


def progress_of(checkpoint: dict[str, Any]) -> str:
    """Where a checkpoint stands: "3" after epoch 3, "4 step 120" inside epoch 4 (util.preempt)."""
    mid = checkpoint.get("mid_epoch")
    return f"{mid['epoch']} step {mid['ranks'][0]['step']}" if mid else str(checkpoint.get("epoch"))


def save_training_state(args, epoch: int, state: dict[str, Any]) -> None:
    """Write checkpoint-<epoch>.pth every --save_freq epochs and at the end, then checkpoint-last.pth.

    The kept file comes first: a kill between the two leaves checkpoint-last.pth at the previous epoch, so the
    restart trains this epoch again and writes both, and no kept checkpoint goes missing. At a kept epoch
    checkpoint-last.pth is a hard link to the kept file, not a second copy: half the disk and write time.
    """
    output = Path(args.output_dir)
    remove_stale_temp_files(output)  # only this process writes checkpoints here: any temp file is a killed save's
    state = dict(state, epoch=epoch)
    if (args.save_freq > 0 and (epoch + 1) % args.save_freq == 0) or epoch + 1 == args.epochs:
        kept = output / f"checkpoint-{epoch}.pth"
        save_atomic(state, kept)
        if link_atomic(kept, output / LAST):
            return
    save_atomic(state, output / LAST)


# Flags that change neither the weights nor the numbers a run reports: where output goes, how often it is
# written or printed, monitors, loader plumbing. Every other difference between a checkpoint's args and the
# resuming run's is listed when it resumes.
NOT_RESULT_FLAGS = frozenset({
    "output_dir", "log_dir", "resume", "auto_resume", "config", "code_version", "reference", "print_freq",
    "save_freq", "vis_freq", "knn_freq", "knn_k", "knn_max_train", "num_workers", "pin_mem", "dist_timeout",
    "max_nan_skips", "eval", "dist_eval", "dist_on_itp", "world_size", "local_rank", "dist_url", "save_every_minutes",
})


def resume_differences(saved: dict[str, Any], args) -> list[str]:
    """`--flag value (checkpoint: old)` for every result-changing flag whose value differs from the checkpoint's."""
    current = vars(args)
    return [f"--{flag} {current[flag]} (checkpoint: {value})" for flag, value in sorted(saved.items())
            if flag in current and flag not in NOT_RESULT_FLAGS and current[flag] != value]


@dataclass
class RunState:
    """Everything a run checkpoints and restores, in one place, for pre-training and downstream runs alike: the
    model, the optimizer, the AMP scaler, the online probe, the method's data state (ContrastiveCrop's boxes),
    the count of skipped steps, with the run's args and the code version read at its start."""

    args: Any
    model: nn.Module
    optimizer: Optional[torch.optim.Optimizer] = None
    scaler: Optional[torch.amp.GradScaler] = None
    probe: Optional[nn.Module] = None
    train_data: Optional[Any] = None  # state_dict() / load_state_dict(), see util.datasets.TrainData
    nan_skips: Optional[Any] = None  # util.metrics.NonFiniteStepSkipper

    def state_dict(self) -> dict[str, Any]:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                 "args": args_to_dict(self.args), "git_sha": self.args.code_version}
        if self.probe is not None:
            state["online_probe"] = self.probe.state_dict()
        if self.nan_skips is not None:
            state["nan_skips"] = self.nan_skips.skipped
        if self.train_data is not None and (train_state := self.train_data.state_dict()):
            state["train_data"] = train_state
        return state

    def save(self, epoch: int) -> None:
        save_training_state(self.args, epoch, self.state_dict())

    def save_mid_epoch(self, epoch: int, ranks: list[dict[str, Any]]) -> None:
        """checkpoint-last.pth inside `epoch`: the weights and optimizer after its first `ranks[0]["step"]`
        micro-steps, and each rank's util.preempt.MidEpoch (rank order). Its `epoch` is the last finished one, as
        for every reader that knows nothing of `mid_epoch`."""
        remove_stale_temp_files(self.args.output_dir)
        state = dict(self.state_dict(), epoch=epoch - 1, mid_epoch={"epoch": epoch, "ranks": ranks})
        save_atomic(state, Path(self.args.output_dir) / LAST)

    def restore(self, checkpoint: dict[str, Any], path: str | Path, weights_only: bool = False) -> int:
        """Load `checkpoint` (read from `path`) into every part; returns the epoch to start from. A ValueError
        names the file when the weights or the data state do not fit. Result-changing flags that differ from
        the checkpoint's are listed; `weights_only` (evaluation) restores the model alone."""
        try:
            load_matching_state(self.model, checkpoint["model"], path)
        except ValueError as err:  # the flags that build the model are the likely cause: name those that differ
            if changed := resume_differences(checkpoint.get("args") or {}, self.args):
                raise ValueError(f"{err}; flags that differ from the checkpoint's: {', '.join(changed)}") from err
            raise
        if weights_only:
            return 0
        if self.train_data is not None:
            self.train_data.load_state_dict(checkpoint.get("train_data", {}))
        if self.probe is not None and "online_probe" in checkpoint:
            self.probe.load_state_dict(checkpoint["online_probe"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.scaler is not None and checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        if self.nan_skips is not None:
            self.nan_skips.skipped = checkpoint.get("nan_skips", 0)
        if changed := resume_differences(checkpoint.get("args") or {}, self.args):
            print(f"note: resuming {path} with flags that change the result: {', '.join(changed)}")
        return checkpoint["epoch"] + 1
