"""Checkpoints inside an epoch: on the pre-emption signal, on SIGTERM, and every --save_every_minutes.

A signal only sets a flag: the handler runs between two bytecodes of the training loop, possibly inside a
collective, where nothing can be saved. The ranks agree on when to save through the all-reduce that the loop
already makes at every --print_freq step (util.metrics.RunningTerms.means carries each rank's vote), and save at
the first optimizer-step boundary from there, all at the same step, with no collective of their own. The
interval is rank 0's clock, so the ranks never disagree about it. After a signal's save the run stops with
`Preempted`, which every rank raises together.

Which signals: SLURM sends SIGTERM to every task when it pre-empts or requeues a job (`scontrol requeue`,
PreemptMode=REQUEUE) and kills it KillWait seconds later (30 by default); submitit's jobs ask for SIGUSR2 90 s
before their time limit (`--signal=USR2@90`), and the launcher then requeues them (util.submit.Trainer). torchrun
forwards SIGTERM to its workers. A save must fit between the signal and the kill: it starts within --print_freq
steps of the signal, and the step lost is at most one interval when it does not (docs/RELIABILITY.md).

Why minutes, not steps: what a kill loses is wall-clock time, whatever a step costs on that GPU and model, and
the save's own cost is in seconds; an interval in minutes fixes both fractions.
"""
import random
import signal
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)
# The default interval, from tools/save_cost.py (docs/RELIABILITY.md): a ViT-B save (1.3 GB) took 6-8 s on this
# project's slowest disk (0.16-0.22 GB/s), so 20 minutes costs under 1% of a ViT-B run; a hard kill (a node
# failure, SIGKILL) then loses at most 20 minutes instead of an epoch. ViT-L (4 GB, 28 s there) wants 60 on such a disk.
SAVE_EVERY_MINUTES = 20.0
SAVE, STOP = 1, 2  # votes: save and go on (the interval), save and stop (a signal)


class Preempted(SystemExit):
    """Raised on every rank after the checkpoint that a pre-emption signal asked for: the run stops, to resume
    from that step. Exit status 128 + the signal, as if the signal had ended the process."""

    raised_on_every_rank = True  # util.dist.stop_together: every rank stops together, no fault to report

    def __init__(self, signum: int, where: str) -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.where = where

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name} after saving {self.where}"


class SaveTrigger:
    """This rank's wish to save (its vote), and what the ranks agreed at the last vote."""

    def __init__(self, every_minutes: float, is_main: bool) -> None:
        self.interval_s = every_minutes * 60
        self.is_main = is_main  # only rank 0's clock votes for the interval
        self.last_save = time.monotonic()
        self.signum: Optional[int] = None
        self.agreed = 0  # 0, SAVE or STOP: what the last vote decided, until the save is made
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Catch the pre-emption signals (main thread only, as Python allows); `uninstall` puts back the handlers
        that were there (submitit's, under submitit)."""
        for signum in PREEMPTION_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame) -> None:
        self.signum = signum
        print(f"received {signal.Signals(signum).name}: saving at the next optimizer step after the next "
              f"--print_freq step, then stopping", flush=True)

    def vote(self) -> list[float]:
        """This rank's votes [stop, save], to be summed over ranks."""
        interval_due = self.is_main and self.interval_s > 0 and time.monotonic() - self.last_save >= self.interval_s
        return [float(self.signum is not None), float(interval_due)]

    def count(self, votes: list[float]) -> None:
        """The votes summed over ranks: a stop anywhere stops every rank; a save goes on."""
        if votes[0] > 0:
            self.agreed = STOP
            self.signum = self.signum or signal.SIGTERM  # a rank that got no signal stops with the others
        elif votes[1] > 0:
            self.agreed = max(self.agreed, SAVE)

    def saved(self) -> None:
        self.last_save = time.monotonic()
        if self.agreed == SAVE:
            self.agreed = 0

    @property
    def stop(self) -> bool:
        return self.agreed == STOP


@dataclass
class MidEpoch:
    """One rank's state inside an epoch, at an optimizer-step boundary: what the next step needs beyond the
    weights and optimizer (util.checkpoint.RunState)."""

    step: int  # micro-steps of the epoch done
    rng: dict  # this rank's random state (rng_state)
    running: dict  # this rank's sums of the logged terms so far (util.metrics.RunningTerms.state_dict)
    skipped_before: int  # --nan_policy skip: skipped steps before this epoch
    elapsed_s: float  # the epoch's time so far, so that epoch_time_s covers the whole epoch

    def to_dict(self) -> dict:
        return asdict(self)


def rng_state() -> dict:
    """Every random state of this process in plain types and tensors (weights_only checkpoints): torch's, the
    CUDA devices', NumPy's and Python's. The data workers draw nothing that matters: each sample's randomness is a
    function of (seed, epoch, index), and their base seed comes from torch's state when the epoch's iterator is made."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    version, internal, python_gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
            "python": [version, list(internal), python_gauss]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, python_gauss = state["python"]
    random.setstate((version, tuple(internal), python_gauss))
