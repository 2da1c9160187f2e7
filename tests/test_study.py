"""tools/study.py end to end at a micro size: both budgets, the runs it plans, and equal compute in the table."""
import argparse

from tools import study


def test_budgets_plan_equal_compute():
    args = argparse.Namespace(methods=["mae", "mi_mae", "mae4", "cmae"], epochs=3, budgets=["epochs", "compute"])
    assert study.planned_runs(args) == [("mae", 3), ("mae", 12), ("mi_mae", 3), ("mae4", 3), ("cmae", 3), ("cmae", 6)]
    args.budgets = ["compute"]
    assert study.planned_runs(args) == [("mae", 12), ("mi_mae", 3), ("mae4", 3), ("cmae", 6)]


def test_micro_study_runs_and_tabulates(tiny_imagefolder, tmp_path):
    out = tmp_path / "study"
    text = study.main(["--data_path", str(tiny_imagefolder), "--output_dir", str(out), "--methods", "mae", "mae4",
                       "--seeds", "0", "--epochs", "1", "--subset_size", "16", "--batch_size", "8", "--probe_images", "16",
                       "--probe_epochs", "1", "--knn_max_train", "16", "--warmup_epochs", "0", "--device", "cpu",
                       "--num_workers", "0"])
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| MAE"):
            rows.setdefault((cells[0], cells[2]), []).append(cells)
    # k-NN and linear probe rows for MAE at 1 and 4 epochs and the control at 1 epoch
    assert sorted(rows) == [("MAE", "1"), ("MAE", "4"), ("MAE x 4 (no MI)", "1")]
    assert all(len(v) == 2 for v in rows.values())
    # equal compute: MAE's 4 epochs see as many masked sequences as the control's 1 (16 images x 4 masks)
    assert rows[("MAE", "4")][0][4] == rows[("MAE x 4 (no MI)", "1")][0][4] == "64"
    assert rows[("MAE", "1")][0][4] == "16"
    assert len((out / "commands.txt").read_text().splitlines()) == 6
    # a second call finds every stage finished and runs nothing
    study.main(["--data_path", str(tiny_imagefolder), "--output_dir", str(out), "--methods", "mae", "mae4", "--seeds", "0",
                "--epochs", "1", "--subset_size", "16", "--batch_size", "8", "--probe_epochs", "1", "--device", "cpu"])
    assert len((out / "commands.txt").read_text().splitlines()) == 6
