"""Frozen record: draws docs/results/info_plane_cifar10.png from the info_plane.json files kept here (each run's
last checkpoint, measured by tools/info_plane.py through tools/study.py --evals info, or by the screens' run).
Run from the repository root: .venv/bin/python docs/results/cifar10/plot_info_plane.py"""
import json
import sys
from pathlib import Path

sys.path.insert(0, ".")
from tools.info_plane import plot  # noqa: E402

HERE, SCREENS = Path("docs/results/cifar10"), Path("docs/results/v_fit_cifar10/info_screens/info_plane.json")
METHODS = [("MAE x 4", "mae4_4ep", "tab:blue"), ("max-MI only", "max_only_4ep", "tab:red"),
           ("MI-MAE (defaults)", "mi_mae_4ep", "tab:green")]
RUNS = {f"{name}, s{seed}": f"{folder}/seed{seed}" for name, folder, _ in METHODS for seed in range(3)}
COLORS = {f"{name}, s{seed}": color for name, _, color in METHODS for seed in range(3)}
COLORS |= {"MI-MAE within-image negatives, gated, s0": "tab:gray", "MI-MAE batch negatives, per-batch gate, s0": "tab:olive"}
runs = {label: next(iter(json.loads((HERE / folder / "info" / "info_plane.json").read_text()).values()))
        for label, folder in RUNS.items()}
screens = json.loads(SCREENS.read_text())
runs["MI-MAE within-image negatives, gated, s0"] = screens["mi_mae_within_image_gated_s0"]
runs["MI-MAE batch negatives, per-batch gate, s0"] = screens["mi_mae_batchneg_pergate_s0"]
plot(runs, Path("docs/results/info_plane_cifar10.png"), COLORS)
