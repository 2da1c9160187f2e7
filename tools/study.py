"""The small-scale reproduction of the MI-MAE paper's Table 1 and ablation tables, in shape (issue 16).

Rows. Table 1: raw pixels (the same probe on the pixels: the floor), random init, MAE, MAE x 4 (no MI), MI-MAE, U-MAE, M-MAE, CMAE. The ablations, all MI-MAE: the
number of masks N, the loss terms, lambda3 (--w_min), orthogonal or independent masks, the InfoNCE tau, CLUB
at the patch or mask level, the lambda readings A and B. Every row is a preset (its method's knobs); the plan's
flags set the data and the budget, the same for every row.

Columns, every one an ordinary command of this codebase on the plan's test split:
  - k-NN and LIN: one cached linear probe (main_linprobe.py): the k-NN top-1 of its frozen features, then its
    trained linear head, on --probe_images class-mixed training images;
  - FT1%: main_finetune.py --label_fraction 0.01, class-balanced, the same images for every row of a seed;
  - FT: main_finetune.py on every label of the pre-training images (the paper fine-tunes on the labelled
    pre-training set: at this scale, the plan's --subset_size images), a short schedule;
  - I(x;z) and I(z;z) (`--evals info`, not run by default): tools/info_plane.py on the last checkpoint, by
    estimators fitted afresh on held-out images, never the run's own V.

Budgets. Equal epochs: every row trains --epochs. Equal compute: every row sees as many masked sequences as
MI-MAE's 4 per image, so the one-sequence rows train 4 x --epochs and CMAE (two views) 2 x; warm-up scales with
the epochs. Every step holds --sequences_per_step masked sequences at one lr (--lr), so the step counts match too.

    python tools/study.py --plan fmnist --table table1 --seeds 0 1 2        # CPU
    python tools/study.py --plan fmnist --table ablations --seeds 0 1 2     # CPU
    python tools/study.py --plan cifar10 --data_path ../shared/data/cifar10-jpg.tar.gz --rows random mae --budgets epochs  # CPU
    python tools/study.py --plan cifar10_full --data_path ../shared/data/cifar10-jpg.tar.gz --table table1  # GPU

Each stage is printed before it runs and listed in OUTPUT/commands.txt with its wall-clock; finished stages are
skipped, so a study goes on where it stopped, over as many sittings as it takes. The end writes OUTPUT/tables.md:
per row and column the mean +- std over the seeds and every seed's value.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MI = "configs/mi_mae/pretrain_vit_tiny_fmnist"  # MI-MAE's small rows; the plan's flags set the data set

# row -> (label, pre-training preset (None: nothing pre-trained), masked sequences per image)
ROWS = {
    "pixels": ("raw pixels (the floor)", None, 0),  # the same probe on the image's standardised pixels (LIN, k-NN)
    "random": ("random init", None, 0),
    "mae": ("MAE", "configs/mae/pretrain_vit_tiny_cifar10.yaml", 1),
    "mae4": ("MAE x 4 (no MI)", f"{MI}_mae4.yaml", 4),
    "mi_mae": ("MI-MAE", f"{MI}.yaml", 4),
    "u_mae": ("U-MAE", "configs/m_mae/pretrain_u_mae_vit_tiny_cifar10.yaml", 1),
    "m_mae": ("M-MAE", "configs/m_mae/pretrain_m_mae_vit_tiny_cifar10.yaml", 1),
    "cmae": ("CMAE", "configs/cmae/pretrain_cmae_vit_tiny_cifar10.yaml", 2),
    "n1": ("N = 1 (MAE in MI-MAE's code)", f"{MI}_mae_n1.yaml", 1),
    "n2": ("N = 2", f"{MI}_n2.yaml", 2),
    "n3": ("N = 3", f"{MI}_n3.yaml", 3),
    "max_only": ("rec x 4 + max-MI", f"{MI}_max_only.yaml", 4),
    "min_only": ("rec x 4 + min-MI", f"{MI}_min_only.yaml", 4),
    "w_min0": ("lambda3 = 0", f"{MI}_w_min0.yaml", 4),
    "w_min1": ("lambda3 = 1", f"{MI}_w_min1.yaml", 4),
    "w_min100": ("lambda3 = 100", f"{MI}_w_min100.yaml", 4),
    "independent": ("independent masks", f"{MI}_independent.yaml", 4),
    "tau0.2": ("tau = 0.2", f"{MI}_tau0.2.yaml", 4),
    "club_mask": ("CLUB per mask", f"{MI}_club_mask.yaml", 4),
    "reading_b": ("lambda reading B", f"{MI}_reading_b.yaml", 4),
}
# table -> [(section title, rows)]; "mi_mae" is the main row (N 4, both terms, lambda3 10, orthogonal, tau 0.07,
# CLUB per patch, reading A), so every ablation shares its runs
TABLES = {
    "table1": [("Table 1", ["pixels", "random", "mae", "mae4", "mi_mae", "u_mae", "m_mae", "cmae"])],
    "ablations": [
        ("number of masks N", ["n1", "n2", "n3", "mi_mae"]),
        ("loss terms (N = 4)", ["mae4", "max_only", "min_only", "mi_mae"]),
        ("lambda3 (--w_min)", ["w_min0", "w_min1", "mi_mae", "w_min100"]),
        ("mask strategy", ["mi_mae", "independent"]),
        ("InfoNCE tau", ["mi_mae", "tau0.2"]),
        ("CLUB level", ["mi_mae", "club_mask"]),
        ("lambda reading", ["mi_mae", "reading_b"]),
    ],
}
EVALS = {"lin": "k-NN and LIN", "ft1": "FT1%", "ft": "FT",
         "info": "I(x; z) and I(z_j; z_k) of the last checkpoint by estimators fitted afresh (tools/info_plane.py)"}
DEFAULT_EVALS = {"table1": ["lin", "ft1", "ft"], "ablations": ["lin"]}

# Budgets. fmnist: the demo's MI-MAE budget (2,000 images x 3 epochs, 4 masks: 375 steps). lr 1e-3
# at 64 masked sequences a step for every row: the presets' MAE rule (blr 1.5e-4) is for 400+ epochs. On 2 CPU
# cores the evaluations must not cost more than the pre-training: a fine-tuning step sees all 64 patches (the
# pre-training encoder 16), so FT1% is 10 epochs of 600 images and FT 3 of 2,000: about 94 steps each. Their
# lr, 4e-3, was chosen among 5e-4, 2e-3, 4e-3 and 8e-3 by FT1% on Fashion-MNIST (docs/RESULTS.md) and is kept for
# CIFAR-10 untested.
PLANS = {
    "fmnist": dict(dataset="fashion_mnist", data_path="/usr/share/datasets/fashion-mnist", epochs=3, subset_size=2000,
                   sequences_per_step=64, lr=1e-3, warmup_epochs=1, probe_images=4000, probe_epochs=30,
                   probe_batch_size=256, ft_batch_size=64, label_fraction=0.01, ft1_epochs=10, ft_epochs=3,
                   ft_lr=4e-3),
    # cifar10: the CPU budget where MAE learns on natural images. A pilot (seed 0) probed MAE at 42.9% LIN against
    # 30.2% for random init after 4 epochs of 10,000 images; 2,000 images x 8 epochs (the old study) stayed below it
    "cifar10": dict(dataset="imagefolder", data_path="", epochs=4, subset_size=10000, sequences_per_step=64, lr=1e-3,
                    warmup_epochs=1, probe_images=4000, probe_epochs=30, probe_batch_size=256, ft_batch_size=64,
                    label_fraction=0.01, ft1_epochs=10, ft_epochs=3, ft_lr=4e-3),
    "cifar10_full": dict(dataset="imagefolder", data_path="", epochs=100, subset_size=0, sequences_per_step=256,
                         lr=6e-4, warmup_epochs=10, probe_images=0, probe_epochs=90,
                         probe_batch_size=1024, ft_batch_size=256, label_fraction=0.01,
                         ft1_epochs=50, ft_epochs=50, ft_lr=1e-3),
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", default="fmnist", choices=list(PLANS), help="data set and budget (each below can override)")
    parser.add_argument("--table", default="table1", choices=list(TABLES), help="Table 1 or the ablations")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=None, help="default: the table's")
    parser.add_argument("--evals", nargs="+", choices=list(EVALS), default=None,
                        help=f"columns to run (default: table1 {DEFAULT_EVALS['table1']}, ablations {DEFAULT_EVALS['ablations']})")
    parser.add_argument("--budgets", nargs="+", choices=["epochs", "compute"], default=None,
                        help="equal epochs, equal compute (masked sequences), or both (default: both for table1, epochs for ablations)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="one run per row and seed")
    parser.add_argument("--output_dir", default=str(ROOT / "study_output"), help="runs, commands.txt, tables.md")
    parser.add_argument("--data_path", default=None,
                        help="data set: a folder (imagefolder: train/ + val/ or test/) or, for imagefolder, a .tar.gz extracted once into OUTPUT/data")
    parser.add_argument("--dataset", default=None, choices=["fashion_mnist", "imagefolder", "cifar10"],
                        help="default: the plan's (fmnist: fashion_mnist; cifar10, cifar10_full: imagefolder, the JPEG copy)")
    for key, value in PLANS["fmnist"].items():
        if key not in ("dataset", "data_path"):
            parser.add_argument(f"--{key}", type=type(value), default=None, help=f"default: the plan's (fmnist: {value})")
    parser.add_argument("--info_images", nargs=2, type=int, default=[768, 256], metavar=("FIT", "EVAL"),
                        help="the info column's held-out images: the fresh estimators are fitted on FIT and evaluated on EVAL others")
    parser.add_argument("--device", default="cuda", help="cuda when available, else the CPU")
    parser.add_argument("--num_workers", default=1, type=int, help="data-loading processes per run")
    parser.add_argument("--stage", default="all", choices=["all", "run", "report"], help="run the stages, write the tables, or both")
    return parser


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every unset option from the plan and the table."""
    for key, value in PLANS[args.plan].items():
        if getattr(args, key, None) in (None, ""):
            setattr(args, key, value)
    args.rows = args.rows or list(dict.fromkeys(r for _, rows in TABLES[args.table] for r in rows))
    args.evals = args.evals or DEFAULT_EVALS[args.table]
    args.budgets = args.budgets or (["epochs", "compute"] if args.table == "table1" else ["epochs"])
    if not args.data_path:
        raise SystemExit(f"--data_path: plan {args.plan} has no default data set; give one")
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


def planned_runs(rows: list[str], epochs: int, budgets: list[str]) -> list[tuple[str, int]]:
    """(row, pre-training epochs) pairs, shared runs once: equal compute gives every row as many masked sequences
    as the 4-mask rows' `epochs` epochs (random init: epochs 0, nothing to pre-train)."""
    runs = []
    for row in rows:
        per_image = ROWS[row][2]
        if per_image == 0:
            runs.append((row, 0))
            continue
        if "epochs" in budgets:
            runs.append((row, epochs))
        if "compute" in budgets:
            runs.append((row, epochs * 4 // per_image))
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


def run_folder(out: Path, row: str, epochs: int, seed: int) -> Path:
    return out / (row if epochs == 0 else f"{row}_{epochs}ep") / f"seed{seed}"


def pretrain_flags(args, row: str, epochs: int, seed: int, common: list[str], folder: Path) -> list[str]:
    per_image = ROWS[row][2]
    batch = max(1, args.sequences_per_step // per_image)
    return ["--config", ROWS[row][1], *common, "--seed", str(seed), "--epochs", str(epochs),
            "--warmup_epochs", str(max(1, round(args.warmup_epochs * epochs / args.epochs))),
            # the plan's own step (--sequences_per_step), not the preset's declared --effective_batch
            "--batch_size", str(batch), "--effective_batch", "0", "--lr", str(args.lr), "--subset_size", str(args.subset_size),
            "--online_probe", "false", "--knn_freq", "0", "--vis_freq", str(epochs), "--print_freq", "100",
            "--output_dir", str(folder)]


def eval_flags(args, kind: str, seed: int, common: list[str], checkpoint: str, folder: Path,
               model: str = "vit_tiny_patch4") -> tuple[str, list[str]]:
    """(script, flags) of one evaluation column."""
    if kind == "info":  # the held-out images and masks drawn from the run's seed
        data = common[:common.index("--device")]  # --dataset, --data_path, --input_size: no device, no workers
        return "tools/info_plane.py", ["--runs", str(Path(checkpoint).parent), *data, "--seed", str(seed),
                                       "--fit_images", str(args.info_images[0]), "--eval_images", str(args.info_images[1]),
                                       "--output_dir", str(folder)]
    base = [*common, "--model", model, "--global_pool", "--seed", str(seed), "--finetune", checkpoint,
            "--print_freq", "1000", "--output_dir", str(folder)]
    if kind == "lin":
        # The probe's lr is far above MAE's 0.1: MAE's LARS recipe runs at batch 16384, and the trust ratio makes
        # the step relative to the weight norm, so it does not rescale with the batch.
        return "main_linprobe.py", [*base, "--cached_features", "true", "--knn_k", "20", "--epochs", str(args.probe_epochs),
                                    "--warmup_epochs", str(max(1, args.probe_epochs // 10)), "--batch_size", str(args.probe_batch_size),
                                    "--blr", "5", "--subset_size", str(args.probe_images)]
    epochs = args.ft1_epochs if kind == "ft1" else args.ft_epochs
    images = ["--label_fraction", str(args.label_fraction)] if kind == "ft1" else ["--subset_size", str(args.subset_size)]
    # MAE's recipe (layer decay, label smoothing) cut to what ~94 steps can use (docs/RESULTS.md, seed 0's MAE at
    # 3 epochs, FT1%): light augmentation (MAE's 8% crops and RandAugment left a nearest-class-mean classifier at
    # 22%, 67% un-augmented), no drop path (0.1: 33% against 47%), and the probe's BatchNorm in front of the head
    # (without it: 27%), since a fresh LayerNorm keeps the pooled features' large per-feature offset.
    return "main_finetune.py", [*base, *images, "--epochs", str(epochs), "--warmup_epochs", str(max(1, epochs // 10)),
                                "--batch_size", str(args.ft_batch_size), "--lr", str(args.ft_lr), "--layer_decay", "0.75",
                                "--drop_path", "0", "--head_batchnorm", "true", "--crop_scale", "0.5", "1", "--aa", "",
                                "--reprob", "0", "--mixup", "0", "--cutmix", "0", "--eval_freq", str(epochs)]


def run_stages(args, out: Path) -> None:
    commands = out / "commands.txt"
    data = dataset_folder(args.data_path, out) if args.dataset == "imagefolder" else Path(args.data_path)
    common = ["--dataset", args.dataset, "--data_path", str(data), "--input_size", "32", "--device", args.device,
              "--num_workers", str(args.num_workers)]
    for seed in args.seeds:  # seed-major: an interrupted study still holds whole comparisons
        for row, epochs in planned_runs(args.rows, args.epochs, args.budgets):
            folder = run_folder(out, row, epochs, seed)
            checkpoint = folder / "pretrain" / "checkpoint-last.pth"
            evals = []
            for kind in args.evals:
                if row == "pixels" and kind != "lin":  # the floor is a probe's: nothing to fine-tune
                    continue
                if kind == "info" and not epochs:  # nothing pre-trained to measure
                    continue
                script, flags = eval_flags(args, kind, seed, common, str(checkpoint) if epochs else "", folder / kind,
                                           "pixels" if row == "pixels" else "vit_tiny_patch4")
                done = ((folder / kind / "info_plane.json").is_file() if kind == "info"
                        else finished(folder / kind, int(flags[flags.index("--epochs") + 1])))
                if not done:
                    evals.append((script, flags))
            # A study restored from its committed logs (docs/results) has no checkpoints: a pre-training whose
            # evaluations are all done is not re-run; one with an evaluation left is, from scratch, if its weights are gone
            if epochs and evals and not (finished(folder / "pretrain", epochs) and checkpoint.is_file()):
                if not checkpoint.is_file():
                    (folder / "pretrain" / "log.txt").unlink(missing_ok=True)  # the log of weights that are gone
                run("main_pretrain.py", pretrain_flags(args, row, epochs, seed, common, folder / "pretrain"), commands)
            for script, flags in evals:
                run(script, flags, commands)


def last_record(folder: Path) -> dict | None:
    """The last line of a run's log.txt, or the last checkpoint's record of an info_plane.json."""
    if (folder / "info_plane.json").is_file():
        records = next(iter(json.loads((folder / "info_plane.json").read_text()).values()))
        return records[-1] if records else None
    log = folder / "log.txt"
    if not log.is_file():
        return None
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else None


def stage_minutes(commands: Path) -> dict[str, float]:
    """Wall-clock minutes per output folder, from commands.txt."""
    minutes = {}
    if commands.is_file():
        for line in commands.read_text().splitlines():
            entry = json.loads(line)
            words = entry["command"].split()
            if "--output_dir" in words:
                minutes[words[words.index("--output_dir") + 1]] = entry["seconds"] / 60
    return minutes


def row_minutes(folder: Path, evals: list[str], minutes: dict[str, float]) -> float:
    """A run's pre-training epochs (its log's epoch_time_s, so a pre-training another study ran counts too) plus its
    evaluations' wall-clock."""
    log = folder / "pretrain" / "log.txt"
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    return sum(r.get("epoch_time_s", 0.0) for r in records) / 60 + sum(minutes.get(str(folder / kind), 0.0) for kind in evals)


COLUMNS = [("knn", "k-NN", "lin", "test_knn_acc1"), ("lin", "LIN", "lin", "test_acc1"),
           ("ft1", "FT1%", "ft1", "test_acc1"), ("ft", "FT", "ft", "test_acc1"),
           ("i_xz", "I(x;z)", "info", "i_xz"), ("i_zz", "I(z;z)", "info", "i_zz")]


def digits(column: str) -> int:
    """Accuracies in % to 2 decimals; the information estimates (nats, some ~0.01) to 3."""
    return 3 if column.startswith("i_") else 2


def cell(values: list[float], seeds: int, decimals: int = 2) -> str:
    """Mean ± sample std of the seeds that have a value, naming their count when some of the `seeds` are missing."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{decimals}f} (1 seed)"
    text = f"{statistics.mean(values):.{decimals}f} ± {statistics.stdev(values):.{decimals}f}"
    return text if len(values) == seeds else f"{text} ({len(values)} seeds)"


def report(args, out: Path) -> str:
    minutes = stage_minutes(out / "commands.txt")
    budgets = {"epochs": "equal epochs", "compute": "equal compute (masked sequences)"}
    lines = [f"Plan {args.plan}: {args.dataset}, {args.subset_size or 'all'} pre-training images, {args.epochs} epochs "
             f"at equal epochs, {args.sequences_per_step} masked sequences a step at lr {args.lr}; seeds {args.seeds}. "
             "Top-1 % on the test split (I(x;z): nats per latent feature, CLUB with a fresh V; I(z;z): nats, held-out "
             "InfoNCE between two masks' pooled latents), mean ± std over seeds, then each seed's value; minutes: the row's stages "
             "(pre-training + its evaluations), mean over the seeds that have a value.", ""]
    # only the columns this table runs (the ablations: k-NN and LIN), so that no column reads as missing
    columns = [c for c in COLUMNS if c[2] in args.evals]
    names = [name for _, name, _, _ in columns]
    # a row asked for by --rows that this table does not list (max-MI only beside Table 1) still gets its line
    others = [row for row in args.rows if not any(row in rows for _, rows in TABLES[args.table])]
    for title, rows in TABLES[args.table] + ([("other rows (--rows)", others)] if others else []):
        for budget in args.budgets:
            lines += [f"### {title}, {budgets[budget]}", "",
                      "| row | epochs | " + " | ".join(names) + f" | per seed ({' / '.join(names)}) | minutes |",
                      "|---|---|" + "---|" * len(columns) + "---|---|"]
            for row in rows:
                if row not in args.rows:
                    continue
                per_image = ROWS[row][2]
                epochs = 0 if per_image == 0 else args.epochs if budget == "epochs" else args.epochs * 4 // per_image
                values, seeds_cells, spent = {c: [] for c, *_ in columns}, [], []
                for seed in args.seeds:
                    folder = run_folder(out, row, epochs, seed)
                    found = []
                    for column, _, kind, key in columns:
                        record = last_record(folder / kind)
                        value = None if record is None else record.get(key)
                        if value is not None:
                            values[column].append(value)
                        found.append("–" if value is None else f"{value:.{digits(column)}f}")
                    seeds_cells.append(f"s{seed}: " + " / ".join(found))
                    if any(value != "–" for value in found):
                        spent.append(row_minutes(folder, args.evals, minutes))
                lines.append(f"| {ROWS[row][0]} | {epochs} | " + " | ".join(cell(values[c], len(args.seeds), digits(c)) for c, *_ in columns)
                             + f" | {'; '.join(seeds_cells)} | {f'{statistics.mean(spent):.1f}' if spent else '–'} |")
            lines.append("")
    text = "\n".join(lines)
    (out / f"tables_{args.table}.md").write_text(text + "\n")
    print(text)
    return text


def main(argv=None) -> str:
    args = resolve(get_args_parser().parse_args(argv))
    missing = [ROWS[r][1] for r in args.rows if ROWS[r][1] and not (ROOT / ROWS[r][1]).is_file()]
    if missing:
        raise SystemExit(f"--rows: no preset {missing}")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.stage in ("all", "run"):
        start = time.time()
        run_stages(args, out)
        print(f"\nstudy stages done in {time.time() - start:.0f} s", flush=True)
    return report(args, out) if args.stage in ("all", "report") else ""


if __name__ == "__main__":
    main()
