"""The demo: pre-train a tiny MI-MAE (or MAE) on Fashion-MNIST (32 px, patch 4), then compare the linear
probe of its encoder with the same probe on a randomly initialised encoder and on the raw pixels (the floor a
representation must clear), on the Fashion-MNIST test set.

    scripts/demo.sh            # sets up .venv and Debian's dataset-fashion-mnist, then runs this

Each stage is an ordinary command of this codebase, printed before it runs; outputs go to --output_dir
(pretrain/: checkpoints, log.txt, reconstruction-*.png, TensorBoard; probe_*/: probe logs).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Both budgets run the encoder on 24,000 masked sequences in 375 steps of 64 sequences (a few minutes on
# 2 cores): MI-MAE's 4 masks per image make 2,000 images x 3 epochs cost what 8,000 cost MAE.
PRETRAIN = {
    "mi_mae": ["--model", "mi_mae_vit_tiny_patch4", "--num_masks", "4", "--batch_size", "16", "--blr", "1.6e-2",
               "--subset_size", "2000"],
    "mae": ["--model", "mae_vit_tiny_patch4", "--batch_size", "64", "--blr", "4e-3", "--subset_size", "8000"],
}


def run(script: str, flags: list[str]) -> None:
    command = [sys.executable, str(ROOT / script), *flags]
    print("\n$ " + " ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=ROOT, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def last_record(output_dir: Path) -> dict:
    return json.loads((output_dir / "log.txt").read_text().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--output_dir", default=str(ROOT / "demo_output"))
    parser.add_argument("--method", default="mi_mae", choices=list(PRETRAIN), help="pre-training method")
    parser.add_argument("--pretrain_epochs", default=3, type=int)
    parser.add_argument("--probe_images", default=4000, type=int, help="training subset for the probes")
    parser.add_argument("--device", default="cuda", help="cuda when available, else the CPU")
    args = parser.parse_args()
    out = Path(args.output_dir)
    common = ["--dataset", "fashion_mnist", "--data_path", args.data_path, "--input_size", "32",
              "--device", args.device, "--num_workers", "2", "--auto_resume", "false"]
    start = time.time()

    run("main_pretrain.py", [*common, *PRETRAIN[args.method], "--norm_pix_loss", "--mask_ratio", "0.75",
                             "--epochs", str(args.pretrain_epochs), "--warmup_epochs", "1", "--vis_freq", "1",
                             "--print_freq", "50", "--output_dir", str(out / "pretrain")])
    checkpoint = out / "pretrain" / "checkpoint-last.pth"
    # The probe's lr is far above MAE's 0.1: MAE's LARS recipe runs at batch 16384, 64x this one, and
    # LARS's trust ratio makes the step relative to the weight norm, so it does not rescale by itself.
    probe = [*common, "--model", "vit_tiny_patch4", "--global_pool", "--cached_features", "true", "--epochs", "30",
             "--warmup_epochs", "3", "--batch_size", "256", "--blr", "5", "--subset_size", str(args.probe_images),
             "--print_freq", "1000"]
    run("main_linprobe.py", [*probe, "--finetune", str(checkpoint), "--output_dir", str(out / "probe_pretrained")])
    run("main_linprobe.py", [*probe, "--output_dir", str(out / "probe_random_init")])
    # the floor: the same probe on the standardised pixels themselves
    run("main_linprobe.py", [*probe, "--model", "pixels", "--output_dir", str(out / "probe_raw_pixels")])

    pretrained, random_init = last_record(out / "probe_pretrained"), last_record(out / "probe_random_init")
    pixels = last_record(out / "probe_raw_pixels")
    gain = pretrained["test_acc1"] - random_init["test_acc1"]
    print("\nFashion-MNIST test set (10,000 images), linear probe on frozen vit_tiny_patch4 features:")
    name = {"mi_mae": "MI-MAE", "mae": "MAE"}[args.method]
    print(f"  {name + ' pre-trained encoder':<28}: top-1 {pretrained['test_acc1']:6.2f}%")
    print(f"  {'random-init encoder':<28}: top-1 {random_init['test_acc1']:6.2f}%")
    print(f"  {'raw pixels (the floor)':<28}: top-1 {pixels['test_acc1']:6.2f}%   (features must beat this to be called good)")
    print(f"  {'gain from pre-training':<28}: {gain:+.2f} points   (total {time.time() - start:.0f} s)")
    records = [json.loads(line) for line in (out / "pretrain" / "log.txt").read_text().splitlines()]
    first, last = records[0], records[-1]
    terms = [k for k in last if k.startswith("train_") and k != "train_lr"]
    print("Pre-training terms, first -> last epoch: " + ", ".join(f"{k[6:]} {first[k]:.4g} -> {last[k]:.4g}" for k in terms))
    print(f"Reconstructions: {out / 'pretrain'}/reconstruction-*.png   TensorBoard: tensorboard --logdir {out}")


if __name__ == "__main__":
    main()
