"""Soak test of kill -9 recovery (docs/RELIABILITY.md, fault 1); minutes long, so not part of the test suite.

    .venv/bin/python tools/soak.py --runs 200

Many pre-training runs of a tiny MAE, each SIGKILLed at random moments and restarted with the same arguments
until it finishes (a run whose first attempt beats its kill time starts again from nothing, so every run is
killed at least once). After every kill it loads every checkpoint in the folder; at the end it checks log.txt and
the final weights. It reports runs completed, kills (and how many landed inside a checkpoint write, seen by
the temporary file they left), checkpoints found corrupt (must be 0), epochs lost or logged twice (must be 0),
and runs whose final weights differ from the uninterrupted run's (must be 0).

Importing torch and timm takes seconds, so this process imports them once and every attempt is an os.fork()
of it that runs main_pretrain.main (milliseconds to start). The parent kills the child at a time drawn
uniformly from [0, --kill_window x the median duration of three uninterrupted runs). Everything runs on one
thread, as forking a process whose thread pools are running is unsafe.
"""
import argparse
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import main_pretrain  # noqa: E402  (after the path set-up above)
from models_mae import MaskedAutoencoderViT  # noqa: E402
from util.checkpoint import LAST, load_checkpoint  # noqa: E402
from util.config import parse_with_config  # noqa: E402

# Tiny enough that an uninterrupted run takes about a second on one CPU thread.
TINY_MAE = dict(patch_size=4, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def tiny_mae(name: str, **kwargs) -> MaskedAutoencoderViT:
    """Stands in for the registry in main_pretrain: `name`'s method supplies img_size, mask_ratio, ..."""
    return MaskedAutoencoderViT(**{**TINY_MAE, **kwargs})


def write_images(folder: Path, count: int, size: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


def run_flags(args: argparse.Namespace, data: Path, out: Path) -> list[str]:
    flags = {"model": "mae_vit_tiny_patch4", "input_size": args.image_size, "data_path": data, "output_dir": out,
             "batch_size": args.batch_size, "epochs": args.epochs, "warmup_epochs": 1, "blr": 1e-3, "num_workers": 0,
             "pin_mem": "false", "amp": "none", "save_freq": 1, "vis_freq": 0, "seed": args.seed, "device": "cpu",
             # --mid_epoch: a checkpoint after every step (the ranks vote at every --print_freq step)
             **({"print_freq": 1, "save_every_minutes": 1e-9} if args.mid_epoch else {"print_freq": 1000, "save_every_minutes": 0})}
    return [item for key, value in flags.items() for item in (f"--{key}", str(value))]


def start_attempt(argv: list[str], console: Path) -> int:
    """Fork a child that runs main_pretrain.main(argv) with its output appended to `console`; returns its pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        fd = os.open(console, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        main_pretrain.main(parse_with_config(main_pretrain.get_args_parser(), argv))
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def wait_or_kill(pid: int, kill_after: float) -> str:
    """Wait for the child; SIGKILL it if still running `kill_after` seconds from now. Returns "finished",
    "killed" or "failed" (it exited with an error: see its console.txt)."""
    deadline = time.monotonic() + kill_after
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return "finished" if os.waitstatus_to_exitcode(status) == 0 else "failed"
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "killed"
        time.sleep(min(remaining, 0.002))


def corrupt_checkpoints(out: Path) -> list[str]:
    """Checkpoints in `out` that do not load (weights_only) or lack their keys."""
    bad = []
    for path in sorted(out.glob("checkpoint-*.pth")):
        try:
            checkpoint = load_checkpoint(path)
            if not {"model", "optimizer", "epoch"} <= set(checkpoint):
                bad.append(f"{path.name}: keys {sorted(checkpoint)}")
        except (ValueError, FileNotFoundError) as err:
            bad.append(f"{path.name}: {err}")
    return bad


def resume_point(checkpoint: dict) -> str:
    """Where main_pretrain.py says it resumes from this checkpoint."""
    mid = checkpoint.get("mid_epoch")
    return f"inside epoch {mid['epoch']} after step {mid['ranks'][0]['step']}" if mid else f"epoch {checkpoint['epoch']} done"


def logged_epochs(out: Path) -> list[int]:
    """Epochs of log.txt's lines (a line that is not JSON counts as epoch -1: a torn write the restart missed)."""
    epochs = []
    for line in (out / "log.txt").read_text().splitlines():
        try:
            epochs.append(json.loads(line)["epoch"])
        except (json.JSONDecodeError, KeyError):
            epochs.append(-1)
    return epochs


@dataclass
class Totals:
    runs_completed: int = 0
    unkilled_first_attempts_redone: int = 0
    attempts: int = 0
    kills: int = 0
    kills_inside_a_checkpoint_write: int = 0
    kills_before_the_first_checkpoint: int = 0
    checkpoints_checked: int = 0
    checkpoints_corrupt: int = 0
    epochs_lost: int = 0
    epochs_logged_twice: int = 0
    kept_checkpoints_missing: int = 0
    kills_leaving_a_checkpoint_inside_an_epoch: int = 0
    restarts_elsewhere_than_the_last_checkpoint: int = 0  # must be 0: a restart continues from the newest save
    temp_files_left_at_the_end: int = 0
    final_weights_equal: int = 0
    final_weights_different: int = 0
    failures: list[str] = field(default_factory=list)


def soak_one(run_dir: Path, argv: list[str], epochs: int, reference: dict, kill_window: float, rng: random.Random,
             totals: Totals, max_attempts: int) -> None:
    console = run_dir / "console.txt"
    kills_before, partial_files_seen = totals.kills, set()
    for _ in range(max_attempts):
        if totals.kills == kills_before and run_dir.exists():  # a run counts only once it has been killed
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        totals.attempts += 1
        try:
            expected = resume_point(load_checkpoint(run_dir / LAST)) if (run_dir / LAST).is_file() else None
        except ValueError:  # counted as corrupt after the kill that left it
            expected = None
        console_before = console.stat().st_size if console.exists() else 0
        outcome = wait_or_kill(start_attempt(argv, console), rng.uniform(0.0, kill_window))
        resumed_at = []
        if console.exists():  # an attempt killed before its first write has none
            with open(console) as f:
                f.seek(console_before)
                resumed_at = re.findall(r"^resumed from \S+ \((.*)\)$", f.read(), flags=re.M)
        # a restart continues from the newest checkpoint (unless killed before it said where)
        totals.restarts_elsewhere_than_the_last_checkpoint += (resumed_at != [expected] if expected and (resumed_at or outcome != "killed")
                                                               else bool(resumed_at))
        if outcome == "failed":
            last_line = (console.read_text().strip().splitlines() or [""])[-1]
            totals.failures.append(f"{run_dir.name}: an attempt failed: {last_line}")
            return
        if outcome == "finished" and totals.kills > kills_before:
            break
        if outcome == "finished":  # faster than its kill time: start the run again from nothing
            totals.unkilled_first_attempts_redone += 1
            continue
        totals.kills += 1
        partial_files = {path.name for path in run_dir.glob(".checkpoint-*.tmp")}  # an older kill's stays till the next save
        totals.kills_inside_a_checkpoint_write += bool(partial_files - partial_files_seen)
        partial_files_seen |= partial_files
        bad = corrupt_checkpoints(run_dir)
        totals.checkpoints_checked += len(list(run_dir.glob("checkpoint-*.pth")))
        totals.checkpoints_corrupt += len(bad)
        totals.failures += [f"{run_dir.name}: corrupt {b}" for b in bad]
        totals.kills_before_the_first_checkpoint += not (run_dir / LAST).is_file()
        if (run_dir / LAST).is_file() and not bad:
            totals.kills_leaving_a_checkpoint_inside_an_epoch += "mid_epoch" in load_checkpoint(run_dir / LAST)
    else:
        totals.failures.append(f"{run_dir.name}: not finished after {max_attempts} attempts")
        return
    totals.runs_completed += 1
    epochs_seen = logged_epochs(run_dir)
    totals.epochs_lost += len(set(range(epochs)) - set(epochs_seen))
    totals.epochs_logged_twice += len(epochs_seen) - len(set(epochs_seen))
    totals.kept_checkpoints_missing += sum(not (run_dir / f"checkpoint-{e}.pth").is_file() for e in range(epochs))
    totals.temp_files_left_at_the_end += len(list(run_dir.glob(".checkpoint-*.tmp")))
    bad = corrupt_checkpoints(run_dir)
    totals.checkpoints_checked += len(list(run_dir.glob("checkpoint-*.pth")))
    totals.checkpoints_corrupt += len(bad)
    final = load_checkpoint(run_dir / LAST)["model"]
    same = final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in final)
    totals.final_weights_equal += same
    totals.final_weights_different += not same
    if not same:
        totals.failures.append(f"{run_dir.name}: final weights differ from the uninterrupted run's")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Kill -9 soak of pre-training", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--runs", default=200, type=int, help="pre-training runs, each killed and restarted until it finishes")
    parser.add_argument("--epochs", default=3, type=int, help="epochs per run (a checkpoint-<epoch>.pth is kept for each)")
    parser.add_argument("--images", default=32, type=int, help="images in the generated dataset")
    parser.add_argument("--image_size", default=16, type=int, help="side of the generated images and of the model's input")
    parser.add_argument("--batch_size", default=8, type=int, help="batch size of every run")
    parser.add_argument("--seed", default=0, type=int, help="seed of the data, the runs and the kill times")
    parser.add_argument("--kill_window", default=0.9, type=float,
                        help="kill times are uniform in [0, this x an uninterrupted run's median duration); below 1 nearly every run "
                             "is killed at least once, and resumed attempts, being shorter, finish")
    parser.add_argument("--max_attempts", default=200, type=int, help="give a run up after this many attempts (reported as a failure)")
    parser.add_argument("--work_dir", default="", help="folder for the data and the runs (default: a temporary folder, deleted after)")
    parser.add_argument("--report", default="", help="also write the figures to this JSON file")
    parser.add_argument("--mid_epoch", action="store_true",
                        help="checkpoints inside the epoch too, after every step (--save_every_minutes ~0, --print_freq 1): "
                             "kills then land between mid-epoch saves, and each restart must continue from the newest")
    return parser


def main(args: argparse.Namespace) -> Totals:
    torch.set_num_threads(1)
    main_pretrain.create_model = tiny_mae
    with tempfile.TemporaryDirectory(prefix="soak-") as temporary:
        root = Path(args.work_dir or temporary)
        write_images(root / "data", args.images, args.image_size, args.seed)
        durations, finals = [], []
        for i in range(3):  # the median duration: one run's time on a shared machine is noisy
            reference_dir = root / f"uninterrupted{i}"
            reference_dir.mkdir(parents=True, exist_ok=True)
            started = time.monotonic()
            if wait_or_kill(start_attempt(run_flags(args, root / "data", reference_dir), reference_dir / "console.txt"), 1e9) != "finished":
                raise SystemExit(f"the uninterrupted run failed: see {reference_dir / 'console.txt'}")
            durations.append(time.monotonic() - started)
            finals.append(load_checkpoint(reference_dir / LAST)["model"])
        duration, reference = sorted(durations)[1], finals[0]
        if not all(torch.equal(final[k], reference[k]) for final in finals for k in reference):
            raise SystemExit("uninterrupted runs differ from each other: nothing to compare the killed runs with")
        print(f"uninterrupted runs: {', '.join(f'{d:.2f}' for d in durations)} s; kill times uniform in "
              f"[0, {duration * args.kill_window:.2f}) s", flush=True)

        rng, totals, soak_start = random.Random(args.seed), Totals(), time.monotonic()
        for run in range(args.runs):
            run_dir = root / f"run{run:04d}"
            soak_one(run_dir, run_flags(args, root / "data", run_dir), args.epochs, reference,
                     duration * args.kill_window, rng, totals, args.max_attempts)
            if (run + 1) % 10 == 0 or run + 1 == args.runs:
                elapsed = time.monotonic() - soak_start
                print(f"{run + 1}/{args.runs} runs, {totals.kills} kills, {totals.checkpoints_corrupt} corrupt, "
                      f"{totals.epochs_lost} epochs lost, {totals.final_weights_different} different; {elapsed:.0f} s", flush=True)
    report = {**asdict(totals), "runs": args.runs, "epochs_per_run": args.epochs,
              "uninterrupted_run_s": round(duration, 3), "soak_wall_s": round(time.monotonic() - soak_start, 1)}
    print(json.dumps(report, indent=1))
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=1) + "\n")
    return totals


if __name__ == "__main__":
    totals = main(get_args_parser().parse_args())
    sys.exit(1 if totals.failures or totals.checkpoints_corrupt or totals.epochs_lost or totals.final_weights_different
             or totals.restarts_elsewhere_than_the_last_checkpoint else 0)
