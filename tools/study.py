"""The small-scale study: MAE, MI-MAE, the compute-matched MAE x 4 control, U-MAE, M-MAE and CMAE on the
CIFAR-10 JPEG copy at 32 px, same ViT (vit_tiny_patch4), seeds and evaluation (k-NN and linear probe on the
10,000 test images), under two budgets:

  - equal epochs: every method trains --epochs epochs on the same images;
  - equal compute: every method processes as many masked sequences as MI-MAE (4 per image) in --epochs
    epochs, so MAE, U-MAE and M-MAE (1 per image) train 4 x --epochs epochs and CMAE (2 views) 2 x.
    MI-MAE and the control are the same runs in both budgets.

    python tools/study.py --data_path ../shared/data/cifar10-jpg.tar.gz --size smoke   # CPU, reduced
    python tools/study.py --data_path ../shared/data/cifar10-jpg.tar.gz --size full    # one GPU

Each stage is an ordinary command of this codebase (printed, and listed in OUTPUT/commands.txt with its
wall-clock); finished stages are skipped, so an interrupted study continues where it stopped. The end writes
OUTPUT/tables.md and OUTPUT/plots/ through tools/make_tables.py.
"""
import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools import make_tables  # noqa: E402

# method -> (pre-training preset, masked sequences per image)
METHODS = {
    "mae": ("configs/mae/pretrain_vit_tiny_cifar10.yaml", 1),
    "mi_mae": ("configs/mi_mae/pretrain_vit_tiny_cifar10.yaml", 4),
    "mae4": ("configs/mi_mae/pretrain_vit_tiny_cifar10_mae4.yaml", 4),
    "u_mae": ("configs/m_mae/pretrain_u_mae_vit_tiny_cifar10.yaml", 1),
    "m_mae": ("configs/m_mae/pretrain_m_mae_vit_tiny_cifar10.yaml", 1),
    "cmae": ("configs/cmae/pretrain_cmae_vit_tiny_cifar10.yaml", 2),
}

# Defaults per size. smoke: 3 seeds of mae, mi_mae and mae4 in about an hour on 2 CPU cores, given a 2,000-image
# test split (docs/RESULTS.md: evaluating on all 10,000 test images would cost more than the pre-training).
# The short budgets need a larger lr than the presets' MAE rule (blr 1.5e-4): lr 1e-3 at batch 64 for all.
SIZES = {
    "smoke": dict(methods=["mae", "mi_mae", "mae4"], epochs=2, subset_size=2000, batch_size=64, blr=4e-3,
                  warmup_epochs=1, probe_images=2000, probe_epochs=30, knn_max_train=2000),
    "full": dict(methods=list(METHODS), epochs=100, subset_size=0, batch_size=256, blr=1.5e-4,
                 warmup_epochs=10, probe_images=0, probe_epochs=90, knn_max_train=50000),
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", required=True,
                        help="CIFAR-10 JPEG copy: the extracted folder (train/, test/) or the .tar.gz, extracted once into OUTPUT/data")
    parser.add_argument("--output_dir", default=str(ROOT / "study_output"), help="runs, commands.txt, tables.md, plots/")
    parser.add_argument("--size", default="smoke", choices=list(SIZES), help="default budget: smoke (CPU) or full (GPU)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=None, help="default: the size's list")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="one run per method and seed")
    parser.add_argument("--budgets", nargs="+", choices=["epochs", "compute"], default=["epochs", "compute"],
                        help="equal epochs, equal compute (masked sequences seen), or both")
    for key, value in SIZES["smoke"].items():
        if key != "methods":
            parser.add_argument(f"--{key}", type=type(value), default=None, help=f"default: the size's (smoke: {value}, full: {SIZES['full'][key]})")
    parser.add_argument("--device", default="cuda", help="cuda when available, else the CPU")
    parser.add_argument("--num_workers", default=2, type=int, help="data-loading processes per run")
    return parser


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every unset option from the size's defaults."""
    for key, value in SIZES[args.size].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def dataset_folder(data_path: str, output_dir: Path) -> Path:
    path = Path(data_path)
    if path.is_dir():
        return path
    if not path.is_file() or not path.name.endswith((".tar.gz", ".tgz")):
        raise SystemExit(f"--data_path: {data_path} is neither a folder nor a .tar.gz")
    target = output_dir / "data"
    marker = target / ".extracted"
    if not marker.is_file():
        print(f"extracting {path} into {target}", flush=True)
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path) as archive:
            archive.extractall(target, filter="data")
        marker.touch()
    folders = [p.parent for p in target.glob("*/train")]
    if len(folders) != 1:
        raise SystemExit(f"--data_path: expected one <name>/train folder in {path}, found {len(folders)}")
    return folders[0]


def planned_runs(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(method, pre-training epochs) pairs: one per method and budget, shared runs listed once."""
    most = max(METHODS[m][1] for m in args.methods)
    runs = []
    for method in args.methods:
        if "epochs" in args.budgets:
            runs.append((method, args.epochs))
        if "compute" in args.budgets:
            runs.append((method, args.epochs * most // METHODS[method][1]))
    return list(dict.fromkeys(runs))


def finished(folder: Path, epochs: int) -> bool:
    log = folder / "log.txt"
    return log.is_file() and sum(1 for line in log.read_text().splitlines() if line.strip()) >= epochs


def run(script: str, flags: list[str], commands: Path) -> None:
    command = [sys.executable, str(ROOT / script), *flags]
    print("\n$ " + " ".join(command[1:]), flush=True)
    start = time.time()
    subprocess.run(command, cwd=ROOT, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    with open(commands, "a") as f:
        f.write(json.dumps({"command": " ".join(command[1:]), "seconds": round(time.time() - start, 1)}) + "\n")


def main(argv=None) -> str:
    args = resolve(get_args_parser().parse_args(argv))
    missing = [m for m in args.methods if not (ROOT / METHODS[m][0]).is_file()]
    if missing:
        raise SystemExit(f"--methods: no preset for {missing} ({[METHODS[m][0] for m in missing]})")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = dataset_folder(args.data_path, out)
    commands = out / "commands.txt"
    common = ["--data_path", str(data), "--input_size", "32", "--device", args.device, "--num_workers", str(args.num_workers)]
    start = time.time()
    for seed in args.seeds:  # seed-major: an interrupted study still holds whole comparisons
        for method, epochs in planned_runs(args):
            folder = out / f"{method}_{epochs}ep" / f"seed{seed}"
            if not finished(folder / "pretrain", epochs):
                run("main_pretrain.py", [
                    "--config", METHODS[method][0], *common, "--seed", str(seed), "--epochs", str(epochs),
                    "--warmup_epochs", str(args.warmup_epochs), "--batch_size", str(args.batch_size), "--blr", str(args.blr),
                    "--subset_size", str(args.subset_size), "--online_probe", "false", "--knn_freq", str(epochs),
                    "--knn_max_train", str(args.knn_max_train), "--vis_freq", str(epochs), "--print_freq", "100",
                    "--output_dir", str(folder / "pretrain")], commands)
            if not finished(folder / "probe", args.probe_epochs):
                # The probe's lr is far above MAE's 0.1: MAE's LARS recipe runs at batch 16384, and the trust
                # ratio makes the step relative to the weight norm, so it does not rescale with the batch.
                run("main_linprobe.py", [
                    *common, "--model", "vit_tiny_patch4", "--global_pool", "--cached_features", "true", "--seed", str(seed),
                    "--epochs", str(args.probe_epochs), "--warmup_epochs", str(max(1, args.probe_epochs // 10)),
                    "--batch_size", "256", "--blr", "5", "--subset_size", str(args.probe_images), "--print_freq", "1000",
                    "--finetune", str(folder / "pretrain" / "checkpoint-last.pth"), "--output_dir", str(folder / "probe")],
                    commands)
    print(f"\nstudy stages done in {time.time() - start:.0f} s; tables:", flush=True)
    return make_tables.main([str(out), "--output", str(out / "tables.md"), "--plot_dir", str(out / "plots")])


if __name__ == "__main__":
    main()
