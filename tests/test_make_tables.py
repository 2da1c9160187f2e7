"""tools/make_tables.py on tiny real runs: the table it writes equals the one computed here from the logs."""
import json
from pathlib import Path

import numpy as np
import pytest

import main_linprobe
import main_pretrain
from tools import make_tables
from util.config import parse_with_config


def _last(folder: Path, key: str) -> float:
    return json.loads((folder / "log.txt").read_text().splitlines()[-1])[key]


def _set_last(folder: Path, key: str, value: float) -> None:
    lines = (folder / "log.txt").read_text().splitlines()
    lines[-1] = json.dumps({**json.loads(lines[-1]), key: value})
    (folder / "log.txt").write_text("\n".join(lines) + "\n")


def _row(text: str, protocol: str, method: str) -> list[str]:
    section = text.split(f"### {protocol},")[1].split("###")[0]
    rows = [line for line in section.splitlines() if line.startswith(f"| {method} |")]
    assert len(rows) == 1, f"{protocol}/{method}: {rows}"
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


def test_tables_match_an_independent_computation(tiny_imagefolder, tmp_path, shallow_models):
    common = ["--data_path", str(tiny_imagefolder), "--device", "cpu", "--num_workers", "0", "--batch_size", "8",
              "--input_size", "32", "--epochs", "1", "--print_freq", "100"]
    pretrain = {"MAE": ["--model", "mae_vit_tiny_patch4"],
                "MAE x 4 (no MI)": ["--model", "mi_mae_vit_tiny_patch4", "--w_max", "0", "--w_min", "0", "--w_v", "0"]}
    probe_config = tmp_path / "linprobe_row.yaml"
    probe_config.write_text("model: vit_tiny_patch4\nreference:\n  source: test\n  metric: top-1\n  value: 50.0\n")
    runs = tmp_path / "runs"
    folders: dict[str, list[Path]] = {name: [] for name in pretrain}
    for name, flags in pretrain.items():
        for seed in (0, 1):
            out = runs / flags[1] / f"seed{seed}" / "pretrain"
            main_pretrain.main(parse_with_config(main_pretrain.get_args_parser(), [
                *common, *flags, "--seed", str(seed), "--knn_freq", "1", "--knn_k", "3", "--vis_freq", "0",
                "--warmup_epochs", "0", "--output_dir", str(out)]))
            probe = out.parent / "probe"
            main_linprobe.main(parse_with_config(main_linprobe.get_args_parser(), [
                "--config", str(probe_config), *common, "--seed", str(seed), "--cached_features", "true", "--blr", "1",
                "--finetune", str(out / "checkpoint-last.pth"), "--output_dir", str(probe)]))
            folders[name].append(out)
            # 8 val images make ties likely: give every run its own value, so a run put in the wrong group shows.
            _set_last(out, "test_knn_acc1", _last(out, "test_knn_acc1") - 7.0 * len(folders) * (seed + 1) + len(name))
            _set_last(probe, "test_acc1", _last(probe, "test_acc1") + 3.0 * (seed + 1) - len(name))
    random_probe = runs / "random" / "probe"
    main_linprobe.main(parse_with_config(main_linprobe.get_args_parser(), [
        *common, "--model", "vit_tiny_patch4", "--cached_features", "true", "--output_dir", str(random_probe)]))

    text = make_tables.main([str(runs), "--output", str(tmp_path / "tables.md"), "--plot_dir", str(tmp_path / "plots")])

    for name, outs in folders.items():
        sequences = 4 if name.startswith("MAE x 4") else 1
        knn = np.array([_last(out, "test_knn_acc1") for out in outs])
        row = _row(text, "k-NN", name)
        assert row[1:6] == [pretrain[name][1], "1", "32", f"{32 * sequences}", "2"]  # 32 images, 1 epoch, 2 seeds
        assert row[6] == f"{knn.mean():.2f} ± {knn.std(ddof=1):.2f}" and row[7:9] == ["-", "-"]
        seconds = [sum(json.loads(line)["epoch_time_s"] for line in (out / "log.txt").read_text().splitlines()) for out in outs]
        assert row[9] == f"{np.mean(seconds) / 60:.1f} min"
        probe = np.array([_last(out.parent / "probe", "test_acc1") for out in outs])
        row = _row(text, "linear probe", name)
        assert row[6] == f"{probe.mean():.2f} ± {probe.std(ddof=1):.2f}"
        assert row[7:9] == ["50.00", f"{probe.mean() - 50:+.2f}"]
    row = _row(text, "linear probe", "random init")
    assert row[5:7] == ["1", f"{_last(random_probe, 'test_acc1'):.2f}"] and row[9] == "-"
    assert (tmp_path / "tables.md").read_text() == text
    plots = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert len(plots) == 2 and all((tmp_path / "plots" / p).read_bytes()[:4] == b"\x89PNG" for p in plots)
    assert "](plots/" in text  # image links relative to the Markdown file


def test_no_runs_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        make_tables.main([str(tmp_path)])
    assert "no finished runs" in capsys.readouterr().err
