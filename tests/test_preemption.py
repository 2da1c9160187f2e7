"""Checkpoints inside an epoch (util/preempt.py): a run stopped by SIGTERM or SLURM's SIGUSR2, or killed with
SIGKILL right after an interval's save, restarts at the saved step and ends with the weights of the run that was
never stopped, bit for bit; one process and 2 gloo ranks, MAE and MI-MAE (V's extra steps and the online probe on).
The runs are tests/fault_worker.py subprocesses with one-block models: 32 images / batch 4 = 8 steps an epoch,
the ranks vote on saving at every second step (--print_freq 2)."""
import random
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import _free_port, finish_script, run_script, start_script
from test_training import assert_same_weights, read_log

import main_pretrain
from util.checkpoint import load_checkpoint
from util.dist import DistInfo
from util.metrics import RunningTerms
from util.preempt import STOP, SaveTrigger, rng_state, set_rng_state

STEPS = 8  # per epoch
RUN = {"input_size": 16, "epochs": 2, "warmup_epochs": 1, "blr": 1e-3, "num_workers": 0, "amp": "none",
       "save_freq": 0, "vis_freq": 0, "print_freq": 2, "seed": 3, "knn_freq": 0, "device": "cpu",
       "online_probe": "true"}
METHODS = {"mae": {"model": "mae_vit_tiny_patch4"},
           "mi_mae": {"model": "mi_mae_vit_tiny_patch4", "num_masks": 2, "v_steps": 2}}


def flags(method: str, ranks: int, data: Path, out: Path, **extra) -> list[str]:
    values = {**RUN, **METHODS[method], "batch_size": 4 // ranks, "data_path": data, "output_dir": out, **extra}
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def run(method: str, ranks: int, data: Path, out: Path, fault: str = "none", n: int = 0, check: bool = True, **extra):
    """tests/fault_worker.py with `fault` on rank $FAULT_RANK (default 0), as one process or under torchrun."""
    command = ["tests/fault_worker.py", fault, str(n), *flags(method, ranks, data, out, **extra)]
    return run_script(command, torchrun=ranks if ranks > 1 else 0, check=check)


@pytest.fixture(scope="module")
def reference(tiny_imagefolder, tmp_path_factory):
    """Final weights and log of each uninterrupted run, made on first use."""
    made = {}

    def get(method: str, ranks: int):
        if (method, ranks) not in made:
            out = tmp_path_factory.mktemp(f"reference_{method}_{ranks}")
            run(method, ranks, tiny_imagefolder, out)
            made[method, ranks] = (load_checkpoint(out / "checkpoint-last.pth"), read_log(out))
        return made[method, ranks]
    return get


def saved_step(out: Path) -> tuple[int, int]:
    mid = load_checkpoint(out / "checkpoint-last.pth")["mid_epoch"]
    return mid["epoch"], mid["ranks"][0]["step"]


def assert_same_run(out: Path, reference) -> None:
    """The weights, optimizer state and probe of the uninterrupted run, and its epoch lines' figures."""
    checkpoint, log = load_checkpoint(out / "checkpoint-last.pth"), read_log(out)
    expected, expected_log = reference
    for key in ("model", "online_probe"):
        assert_same_weights(checkpoint[key], expected[key])
    assert [record["epoch"] for record in log] == [0, 1]
    for ours, theirs in zip(log, expected_log):
        for key, value in theirs.items():
            if key.startswith("train_"):
                assert ours[key] == pytest.approx(value, rel=1e-6), key


@pytest.mark.slow
@pytest.mark.parametrize("method,ranks,signum", [("mae", 1, signal.SIGTERM), ("mi_mae", 1, signal.SIGUSR2),
                                                 ("mae", 2, signal.SIGTERM), ("mi_mae", 2, signal.SIGTERM)])
def test_a_signal_saves_at_the_next_step_and_the_restart_continues_there(method, ranks, signum, reference,
                                                                         tiny_imagefolder, tmp_path, monkeypatch):
    """The signal comes after forward 11 (epoch 1, step index 2), to the last rank alone: the ranks agree at the
    vote after step index 3 and save there, inside epoch 1 after 4 steps, then stop with 128 + the signal (the
    ranks that got none with SIGTERM's). The restart's first step is the fifth of epoch 1."""
    monkeypatch.setenv("FAULT_RANK", str(ranks - 1))
    fault = "term_at_step" if signum == signal.SIGTERM else "usr2_at_step"
    stopped = run(method, ranks, tiny_imagefolder, tmp_path, fault, STEPS + 3, check=False, save_every_minutes=0)
    assert stopped.returncode != 0 and "after saving epoch 1 at step 4 of 8" in stopped.stdout + stopped.stderr, \
        stopped.stderr[-3000:]
    if ranks == 1:
        assert stopped.returncode == 128 + signum
    assert saved_step(tmp_path) == (1, 4)
    assert [record["epoch"] for record in read_log(tmp_path)] == [0]

    restarted = run(method, ranks, tiny_imagefolder, tmp_path)
    assert "resumed from" in restarted.stdout and "(inside epoch 1 after step 4)" in restarted.stdout
    assert "Epoch: [1] [6/8]" in restarted.stdout and "Epoch: [1] [4/8]" not in restarted.stdout
    assert read_log(tmp_path)[1]["resumed_at_step"] == 4
    assert_same_run(tmp_path, reference(method, ranks))


@pytest.mark.slow
@pytest.mark.parametrize("method,ranks", [("mae", 1), ("mi_mae", 2)])
def test_a_kill_after_an_interval_save_loses_nothing_beyond_it(method, ranks, reference, tiny_imagefolder, tmp_path):
    """--save_every_minutes small enough to save at every vote (steps 2, 4 and 6 of each epoch); SIGKILL right after
    the 4th such save (epoch 1, after step 2): the restart continues after step 2 of epoch 1."""
    killed = run(method, ranks, tiny_imagefolder, tmp_path, "kill_after_mid_save", 4, check=False, save_every_minutes=1e-6)
    assert killed.returncode != 0
    assert saved_step(tmp_path) == (1, 2)
    restarted = run(method, ranks, tiny_imagefolder, tmp_path, save_every_minutes=1e-6)
    assert "(inside epoch 1 after step 2)" in restarted.stdout
    assert_same_run(tmp_path, reference(method, ranks))


@pytest.mark.slow
def test_torchrun_max_restarts_resumes_inside_the_epoch(reference, tiny_imagefolder, tmp_path, monkeypatch):
    """Rank 0, the writer, dies (SIGKILL) right after the 4th interval save; torchrun --max-restarts 1 restarts
    both ranks, which continue from that step."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1",
               "--master_port", str(_free_port()), "tests/fault_worker.py", "kill_after_mid_save", "4",
               *flags("mae", 2, tiny_imagefolder, tmp_path, save_every_minutes=1e-6)]
    result = finish_script(start_script(command), 300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(inside epoch 1 after step 2)" in result.stdout
    assert_same_run(tmp_path, reference("mae", 2))


def test_resuming_inside_an_epoch_needs_the_same_number_of_processes():
    checkpoint = {"epoch": 0, "mid_epoch": {"epoch": 1, "ranks": [{"step": 4}, {"step": 4}]}}
    with pytest.raises(SystemExit, match=r"saved inside epoch 1 by 2 process\(es\), and this run has 1: resume it on 2"):
        main_pretrain.mid_epoch_of(checkpoint, Path("x.pth"), DistInfo(rank=0, world_size=1))


def test_random_state_and_running_sums_round_trip():
    """What a rank saves inside an epoch comes back exactly: the next draws of torch, NumPy and Python, and the sums
    that make the epoch's means."""
    state = rng_state()
    draws = (torch.rand(3), np.random.rand(2), random.random())
    set_rng_state(state)
    assert torch.equal(torch.rand(3), draws[0]) and np.array_equal(np.random.rand(2), draws[1]) and random.random() == draws[2]
    terms = RunningTerms(torch.device("cpu"))
    for step in range(3):
        terms.add({"loss": torch.tensor(float(step)), "rec": torch.tensor(2.0 * step)}, step)
    resumed = RunningTerms(torch.device("cpu"))
    resumed.load_state_dict(terms.state_dict())
    for running in (terms, resumed):
        running.add({"loss": torch.tensor(5.0), "rec": torch.tensor(1.0)}, 3)
    assert resumed.means() == terms.means() == {"loss": 2.0, "rec": 1.75}


def test_the_ranks_agree_on_a_signal_anywhere_and_on_rank_0s_clock():
    rank0, rank1 = SaveTrigger(0, is_main=True), SaveTrigger(0, is_main=False)
    rank1._on_signal(signal.SIGTERM, None)
    votes = [a + b for a, b in zip(rank0.vote(), rank1.vote())]
    for trigger in (rank0, rank1):
        trigger.count(votes)
        assert trigger.agreed == STOP and trigger.signum == signal.SIGTERM
    clock0, clock1 = SaveTrigger(1e-9, is_main=True), SaveTrigger(1e-9, is_main=False)
    assert clock1.vote() == [0.0, 0.0] and clock0.vote() == [0.0, 1.0]  # only rank 0's interval votes
