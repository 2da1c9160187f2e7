"""Does MI-MAE's information bottleneck act? The demo's budget (Fashion-MNIST, 32 px, vit_tiny_patch4, 24,000
masked sequences in 375 steps) for MAE, the MAE x 4 control, MI-MAE and its one-term ablations, 3 seeds each,
every epoch's checkpoint measured by tools/info_plane.py (estimators fitted afresh, never the run's own V).

    python tools/bottleneck_study.py --output_dir study_bottleneck --seeds 0   # ~95 min a seed on 2 CPU cores

Finished stages are skipped (an interrupted study goes on where it stopped); every command and its wall-clock
go to OUTPUT/commands.txt. The end writes OUTPUT/bottleneck.md (mean +- std and per-seed values) and
OUTPUT/info_plane.png (each configuration's mean trajectory).
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools import info_plane  # noqa: E402
from tools.demo import PRETRAIN  # noqa: E402
from tools.study import finished, run  # noqa: E402

# name -> (label, flags on top of the demo's pre-training budget for the method)
CONFIGS = {
    "mae": ("MAE", PRETRAIN["mae"]),
    "mae4": ("MAE x 4 (no MI)", [*PRETRAIN["mi_mae"], "--w_max", "0", "--w_min", "0", "--w_v", "0"]),
    "mi_mae": ("MI-MAE (both terms)", PRETRAIN["mi_mae"]),
    "max_only": ("max-MI only", [*PRETRAIN["mi_mae"], "--w_min", "0", "--w_v", "0"]),
    "min_only": ("min-MI only", [*PRETRAIN["mi_mae"], "--w_max", "0"]),
    "estimator_only": ("max-MI, V fitted but unused (w_min 0)", [*PRETRAIN["mi_mae"], "--w_min", "0"]),
    "mask_level": ("MI-MAE, CLUB per mask", [*PRETRAIN["mi_mae"], "--club_level", "mask"]),
}
COLUMNS = [("train_rec", "rec"), ("test_knn_acc1", "k-NN %"), ("i_xz", "I(x;z) CLUB fresh V"),
           ("i_xz_gaussian", "I(x;z) Gaussian"), ("i_zz", "I(z_j;z_k) InfoNCE"),
           ("club_within_image", "fresh V, within-image CLUB"), ("train_min_mi", "run's CLUB"),
           ("fresh_v_gain", "fresh V's gain"), ("train_v_gain", "run's v_gain"), ("train_latent_std", "latent std")]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--output_dir", default=str(ROOT / "study_bottleneck"))
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--extra", nargs="+", default=[], metavar="NAME=FLAGS",
                        help="further MI-MAE configurations, e.g. tau02='--mi_temperature 0.2'")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3, help="the demo's 3")
    parser.add_argument("--device", default="cuda", help="cuda when available, else the CPU")
    parser.add_argument("--num_workers", type=int, default=1)
    parser.add_argument("--stage", choices=["all", "pretrain", "measure", "report"], default="all")
    return parser


def configurations(args) -> dict:
    configs = {name: CONFIGS[name] for name in args.configs}
    for item in args.extra:
        name, _, flags = item.partition("=")
        configs[name] = (name, [*PRETRAIN["mi_mae"], *flags.split()])
    return configs


def main(argv=None) -> None:
    args = get_args_parser().parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    commands = out / "commands.txt"
    configs = configurations(args)
    common = ["--dataset", "fashion_mnist", "--data_path", args.data_path, "--input_size", "32", "--device", args.device,
              "--num_workers", str(args.num_workers), "--norm_pix_loss", "--mask_ratio", "0.75", "--epochs", str(args.epochs),
              "--warmup_epochs", "1", "--save_freq", "1", "--vis_freq", "0", "--print_freq", "125",
              "--knn_freq", str(args.epochs), "--knn_max_train", "4000"]
    for seed in args.seeds:  # seed-major: an interrupted study holds whole comparisons
        for name, (_, flags) in configs.items():
            folder = out / name / f"seed{seed}"
            if args.stage in ("all", "pretrain") and not finished(folder, args.epochs):
                run("main_pretrain.py", [*common, *flags, "--seed", str(seed), "--output_dir", str(folder)], commands)
            plane = folder / "info_plane" / "info_plane.json"
            if args.stage in ("all", "measure") and finished(folder, args.epochs) and not plane.is_file():
                run("tools/info_plane.py", ["--runs", str(folder), "--labels", name, "--data_path", args.data_path,
                                            "--dataset", "fashion_mnist", "--input_size", "32", "--seed", str(seed),
                                            "--output_dir", str(folder / "info_plane")], commands)
    if args.stage in ("all", "report"):
        report(out, configs, args.seeds, args.epochs)


def _runs(out: Path, name: str, seeds: list[int]):
    """Per finished seed: the last epoch's log record merged with that epoch's info-plane record, and all of the latter."""
    found = {}
    for seed in seeds:
        folder = out / name / f"seed{seed}"
        plane = folder / "info_plane" / "info_plane.json"
        if not plane.is_file():
            continue
        records = json.loads(plane.read_text())[name]
        log = [json.loads(line) for line in (folder / "log.txt").read_text().splitlines()]
        found[seed] = ({**log[-1], **records[-1]}, records)
    return found


def report(out: Path, configs: dict, seeds: list[int], epochs: int) -> None:
    lines = [f"Demo budget, {epochs} epochs, seeds {seeds}; last epoch's values, mean ± std over seeds (per-seed values "
             "below). I(x;z) in nats per latent feature, I(z_j;z_k) in nats (bound capped at log 256 = 5.55).", "",
             "| configuration | seeds | " + " | ".join(title for _, title in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    per_seed, trajectories = [], {}
    for name, (label, _) in configs.items():
        runs = _runs(out, name, seeds)
        if not runs:
            continue
        cells = []
        for key, _ in COLUMNS:
            values = [last[key] for last, _ in runs.values() if last.get(key) is not None]
            if not values:
                cells.append("–")
            elif len(values) == 1:
                cells.append(f"{values[0]:.3f}")
            else:
                cells.append(f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}")
        lines.append(f"| {label} | {len(runs)} | " + " | ".join(cells) + " |")
        for seed, (last, _) in runs.items():
            per_seed.append(f"| {label} | {seed} | " + " | ".join(
                f"{last[key]:.3f}" if last.get(key) is not None else "–" for key, _ in COLUMNS) + " |")
        epochs_seen = sorted({r["epoch"] for _, records in runs.values() for r in records})
        trajectories[label] = [
            {"epoch": e, **{k: statistics.mean(r[k] for _, records in runs.values() for r in records if r["epoch"] == e)
                            for k in ("i_xz", "i_zz")}} for e in epochs_seen]
    lines += ["", "Per seed:", "", "| configuration | seed | " + " | ".join(t for _, t in COLUMNS) + " |",
              "|---|---|" + "---|" * len(COLUMNS), *per_seed]
    (out / "bottleneck.md").write_text("\n".join(lines) + "\n")
    (out / "trajectories.json").write_text(json.dumps(trajectories, indent=1) + "\n")
    info_plane.plot(trajectories, out / "info_plane.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
