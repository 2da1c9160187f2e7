"""Set-up shared by the main scripts: output folder, seeding, device, per-epoch log lines, data loaders."""
import itertools
import json
import os
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from util.batch import BatchPlan, apply_batch_plan, effective_lr
from util.config import command_line, git_sha, save_args
from util.cuda_build import check_device
from util.dist import DistInfo, is_main_process
from util.dry_run import drop_dry_run_args
from util.precision import resolve_precision


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def prepare_output_dir(args) -> None:
    """Record the code version once, in `args.code_version` (a commit made later during the run does not change
    what its checkpoints name), create output_dir, write args.yaml (rank 0 only) and print both. Call it once
    every argument is resolved (the effective lr, the precision), so that args.yaml holds what the run uses."""
    if getattr(args, "code_version", None) is None:
        args.code_version = git_sha()
    print(f"git: {args.code_version}\ncommand: {command_line()}")
    if not args.output_dir:
        return
    if is_main_process():
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        save_args(args, args.output_dir)
    print("arguments:\n" + "\n".join(f"  {k}: {v}" for k, v in sorted(vars(args).items())))


def append_log(output_dir: str, record: dict) -> None:
    """One JSON line per epoch in output_dir/log.txt (rank 0 only)."""
    if output_dir and is_main_process():
        with open(Path(output_dir) / "log.txt", "a") as f:
            f.write(json.dumps(record) + "\n")


def truncate_log(output_dir: str, start_epoch: int) -> None:
    """On (re)start, drop log lines of epochs that will be trained again, so each epoch appears exactly once.

    A line cut short by a kill is dropped too, and the file is replaced atomically: a kill here loses nothing."""
    path = Path(output_dir) / "log.txt"
    if not (is_main_process() and path.is_file()):
        return
    kept = [line for line in path.read_text().splitlines() if (epoch := _epoch_of(line)) is not None and epoch < start_epoch]
    partial = path.with_name(".log.txt.tmp")
    partial.write_text("".join(line + "\n" for line in kept))
    os.replace(partial, path)


def _epoch_of(line: str) -> Optional[int]:
    try:
        return json.loads(line)["epoch"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


def resolve_device(requested: str) -> torch.device:
    """The device to run on: the CPU when CUDA is asked for and absent. Stops, naming the install command, on a GPU
    that this torch build has no kernels for (util.cuda_build.check_device)."""
    if requested.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available: running on the CPU")
        return torch.device("cpu")
    device = torch.device(requested)
    check_device(device)
    return device


class ResumableSampler(DistributedSampler):
    """DistributedSampler whose epoch can start after its first samples: a run resumed inside an epoch
    (util.preempt) reads the rest of the epoch's order, and only that. `set_epoch` starts at the beginning."""

    skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return self.num_samples - self.skip


def make_loader(dataset: Dataset, info: DistInfo, args, train: bool) -> DataLoader:
    """A loader over this rank's shard. Training shuffles by (seed, epoch) and drops the last partial batch.

    Workers are not persistent: the per-sample seeds read the epoch when the dataset reaches the workers.
    """
    sampler = ResumableSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=train,
                               seed=args.seed, drop_last=train)
    return DataLoader(
        dataset, sampler=sampler, batch_size=args.batch_size, num_workers=args.num_workers,
        pin_memory=args.pin_mem and torch.cuda.is_available(), drop_last=train,
    )


def default_workers() -> int:
    return min(10, os.cpu_count() or 1)


def start_run(args, info: DistInfo, device: torch.device, whole_batch: Optional[str] = None) -> torch.device:
    """The start-up every main script shares, before any data or model is touched: the device (and whether this
    torch build runs on it), the precision, the batch plan for this world size (`whole_batch`: why the method needs
    accum_iter 1, util.batch), the lr, the output folder with args.yaml, the seeds. Returns the device to run on;
    SystemExit for what cannot run."""
    device = resolve_device(str(device))
    resolve_precision(args, device)  # --amp and --tf32 as they run (args.yaml records that); sets TF32 on a GPU
    apply_batch_plan(args, info.world_size, whole_batch)
    set_effective_lr(args, info)
    drop_dry_run_args(args)
    prepare_output_dir(args)
    seed_everything(args.seed)
    return device


def set_effective_lr(args, info: DistInfo) -> None:
    """MAE's rule: lr = blr x effective batch / 256 unless --lr is given; effective = batch x accum_iter x ranks."""
    plan = BatchPlan(info.world_size, args.batch_size, args.accum_iter)
    args.lr = effective_lr(args, plan)
    print(f"base lr: {args.blr:.3e}  effective batch: {plan.effective}  lr: {args.lr:.3e}")
