"""tools/study.py end to end at a micro size: the runs it plans for both budgets, every column, and the table."""
import json

from tools import study


def test_budgets_plan_equal_compute():
    rows = ["random", "mae", "mi_mae", "mae4", "cmae", "n2"]
    assert study.planned_runs(rows, 3, ["epochs", "compute"]) == [
        ("random", 0), ("mae", 3), ("mae", 12), ("mi_mae", 3), ("mae4", 3), ("cmae", 3), ("cmae", 6), ("n2", 3), ("n2", 6)]
    assert study.planned_runs(rows, 3, ["compute"]) == [("random", 0), ("mae", 12), ("mi_mae", 3), ("mae4", 3), ("cmae", 6), ("n2", 6)]


def test_every_row_has_a_preset_and_every_table_row_is_known():
    for row, (_, preset, _) in study.ROWS.items():
        assert preset is None or (study.ROOT / preset).is_file(), row
    assert {row for sections in study.TABLES.values() for _, rows in sections for row in rows} <= set(study.ROWS)


def test_micro_study_runs_every_column_and_tabulates(tiny_imagefolder, tmp_path):
    out = tmp_path / "study"
    flags = ["--plan", "fmnist", "--dataset", "imagefolder", "--data_path", str(tiny_imagefolder), "--output_dir", str(out), "--rows", "random", "mae",
             "--seeds", "0", "--epochs", "1", "--subset_size", "16", "--sequences_per_step", "8",
             "--probe_images", "16", "--probe_epochs", "1", "--probe_batch_size", "8", "--ft_batch_size", "8", "--label_fraction", "0.5", "--ft1_epochs", "1", "--ft_epochs", "1",
             "--warmup_epochs", "1", "--device", "cpu", "--num_workers", "0"]
    text = study.main(flags)
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] in ("random init", "MAE"):
            rows.setdefault(cells[0], []).append(cells)
    # one line per budget; MAE at equal compute trains 4 x the epochs (as many masked sequences as MI-MAE's 4)
    assert [r[1] for r in rows["MAE"]] == ["1", "4"] and [r[1] for r in rows["random init"]] == ["0", "0"]
    # every column filled: k-NN, LIN, FT1%, FT, and the seed's values
    for cells in rows["MAE"] + rows["random init"]:
        assert all(c.endswith("(1 seed)") for c in cells[2:6]), cells
        values = [float(v) for v in cells[6].removeprefix("s0: ").split(" / ")]
        assert [f"{v:.2f} (1 seed)" for v in values] == cells[2:6] and all(0 <= v <= 100 for v in values)
    # random init: 3 evaluations; MAE at 1 and 4 epochs: 1 pre-training + 3 evaluations each
    assert len((out / "commands.txt").read_text().splitlines()) == 3 + 2 * 4
    # a second call finds every stage finished and runs nothing
    study.main(flags)
    assert len((out / "commands.txt").read_text().splitlines()) == 3 + 2 * 4
    # restored from committed logs (no checkpoints): nothing re-runs while every evaluation is done; an evaluation
    # left re-runs its pre-training from scratch first (one log, not two appended), and nothing else
    for checkpoint in out.glob("*/seed0/pretrain/checkpoint-*.pth"):
        checkpoint.unlink()
    study.main(flags)
    assert len((out / "commands.txt").read_text().splitlines()) == 3 + 2 * 4
    (out / "mae_1ep" / "seed0" / "ft" / "log.txt").unlink()
    study.main(flags)
    rerun = [line for line in (out / "commands.txt").read_text().splitlines()[3 + 2 * 4:]]
    assert len(rerun) == 2 and "main_pretrain.py" in rerun[0] and "mae_1ep/seed0/ft" in rerun[1]
    assert len((out / "mae_1ep" / "seed0" / "pretrain" / "log.txt").read_text().splitlines()) == 1


def test_the_info_column_measures_the_last_checkpoint_with_fresh_estimators(tiny_imagefolder, tmp_path):
    """--evals info runs tools/info_plane.py on the row's pre-training (not on random init) and tabulates its
    I(x; z) and I(z_j; z_k), to 3 decimals, from the info_plane.json it wrote; a second call runs nothing."""
    out = tmp_path / "study"
    flags = ["--plan", "fmnist", "--dataset", "imagefolder", "--data_path", str(tiny_imagefolder), "--output_dir", str(out),
             "--rows", "random", "mae", "--budgets", "epochs", "--evals", "info", "--info_images", "4", "4", "--seeds", "0",
             "--epochs", "1", "--subset_size", "16", "--sequences_per_step", "8", "--warmup_epochs", "1",
             "--device", "cpu", "--num_workers", "0"]
    text = study.main(flags)
    commands = (out / "commands.txt").read_text().splitlines()
    assert len(commands) == 2 and "tools/info_plane.py" in commands[1] and "--fit_images 4 --eval_images 4" in commands[1]
    measured = json.loads((out / "mae_1ep" / "seed0" / "info" / "info_plane.json").read_text())
    record = next(iter(measured.values()))[-1]
    row = next(line for line in text.splitlines() if line.startswith("| MAE |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:4] == [f"{record['i_xz']:.3f} (1 seed)", f"{record['i_zz']:.3f} (1 seed)"]
    assert next(line for line in text.splitlines() if line.startswith("| random init |")).count("–") >= 2
    study.main(flags)
    assert len((out / "commands.txt").read_text().splitlines()) == 2


def test_cells_give_mean_sample_std_and_the_seed_count():
    assert study.cell([70.0, 72.0, 74.0], 3) == "72.00 ± 2.00"
    assert study.cell([70.0, 72.0], 3) == "71.00 ± 1.41 (2 seeds)"
    assert study.cell([70.0], 3) == "70.00 (1 seed)" and study.cell([], 3) == "–"


def test_report_prints_only_the_columns_the_table_runs(tmp_path):
    """The ablations run k-NN and LIN only: their tables have no FT columns that would read as missing cells, even
    where an FT log happens to exist."""
    args = study.resolve(study.get_args_parser().parse_args(
        ["--table", "ablations", "--rows", "n2", "--seeds", "0", "1", "--output_dir", str(tmp_path), "--data_path", "x"]))
    for seed, (knn, lin) in enumerate([(61.0, 64.0), (63.0, 66.0)]):
        folder = study.run_folder(tmp_path, "n2", args.epochs, seed)
        for kind, record in [("lin", {"test_knn_acc1": knn, "test_acc1": lin}), ("ft", {"test_acc1": 99.0})]:
            (folder / kind).mkdir(parents=True)
            (folder / kind / "log.txt").write_text(json.dumps(record) + "\n")
    lines = [line for line in study.report(args, tmp_path).splitlines() if line.startswith("| ")]
    assert lines[0] == "| row | epochs | k-NN | LIN | per seed (k-NN / LIN) | minutes |"
    cells = [c.strip() for c in lines[1].strip("|").split("|")]
    assert cells[1:5] == [str(args.epochs), "62.00 ± 1.41", "65.00 ± 1.41", "s0: 61.00 / 64.00; s1: 63.00 / 66.00"]


def test_a_row_outside_the_table_is_reported_not_dropped(tmp_path):
    """--table table1 --rows mae4 max_only: max-MI only is an ablation row, but it ran, so the report lists it
    (in its own section) instead of leaving it out silently."""
    args = study.resolve(study.get_args_parser().parse_args(
        ["--table", "table1", "--rows", "mae4", "max_only", "--budgets", "epochs", "--evals", "lin", "--seeds", "0",
         "--output_dir", str(tmp_path), "--data_path", "x"]))
    for row, lin in [("mae4", 45.0), ("max_only", 37.0)]:
        folder = study.run_folder(tmp_path, row, args.epochs, 0) / "lin"
        folder.mkdir(parents=True)
        (folder / "log.txt").write_text(json.dumps({"test_knn_acc1": lin - 5, "test_acc1": lin}) + "\n")
    text = study.report(args, tmp_path)
    assert "### other rows (--rows), equal epochs" in text
    rows = [line for line in text.splitlines() if line.startswith(("| MAE x 4", "| rec x 4 + max-MI"))]
    assert len(rows) == 2 and "37.00 (1 seed)" in rows[1] and "45.00 (1 seed)" in rows[0]
