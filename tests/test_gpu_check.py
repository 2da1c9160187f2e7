"""tools/gpu_check.sh: its dry mode runs every row on the CPU and prints the GPU table of docs/PERFORMANCE.md; its
GPU plan passes flags the tools accept and fills the same table."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tools import benchmark, compare_official, gpu_check

ROOT = Path(__file__).resolve().parent.parent

# A stand-in for a checkout of facebookresearch/mae: their class name, constructor and (loss, pred, mask) forward,
# with the masks drawn from the global generator as theirs are; the model itself is ours.
FAKE_OFFICIAL_MODELS = """
import torch
from models_mae import MaskedAutoencoderViT as Ours


class MaskedAutoencoderViT(Ours):
    def __init__(self, norm_layer=None, **kwargs):
        super().__init__(**kwargs)

    def forward(self, imgs, mask_ratio=0.75):
        noise = torch.rand(imgs.shape[0], self.num_patches, device=imgs.device)
        return super().forward(imgs, noise).loss, None, None
"""


def documented_gpu_table_header() -> str:
    text = (ROOT / "docs" / "PERFORMANCE.md").read_text()
    (header,) = [line for line in text.splitlines() if line.startswith("| device | model | batch |")]
    return header


def table_rows(out: str, header: str) -> list[list[str]]:
    lines = out.splitlines()
    start = lines.index(header) + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_dry_run_prints_the_documented_tables(tmp_path):
    official = tmp_path / "mae"
    (official / "util").mkdir(parents=True)
    (official / "models_mae.py").write_text(FAKE_OFFICIAL_MODELS)
    (official / "util" / "pos_embed.py").write_text("")
    env = {**os.environ, "MAE": str(official), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    env.pop("DATA", None)
    run = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--dry-run", "--json", str(tmp_path / "rows.jsonl")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    header = documented_gpu_table_header()
    rows = table_rows(run.stdout, header)
    assert len(rows) == 8 and all(len(row) == 9 for row in rows), run.stdout
    assert "failed" not in run.stdout and "skipped" not in run.stdout, run.stdout
    precisions = [row[3] for row in rows]
    assert precisions == ["bf16", "bf16", "fp16 (GradScaler)", "fp32, no TF32", "fp32, no TF32", "bf16", "fp16 (GradScaler)",
                          "bf16, `--compile`"]  # no TF32 on a CPU, whatever --tf32 says
    for row in rows:
        assert float(row[4].replace(",", "")) > 0 and row[5].endswith("%") and ("MB" in row[8] or "GB" in row[8])
    official_rows = [row for row in rows if "vs official" in row[1]]
    assert len(official_rows) == 2 and all(float(row[6]) > 0 and row[7].startswith("**") for row in official_rows)
    data = table_rows(run.stdout, "| workers | ours images/s | per worker | official images/s | per worker | ours / official | start-up (ours, official) |")
    assert [row[0] for row in data] == ["1", "2"] and all(float(row[i].replace(",", "")) > 0 for row in data for i in (1, 3))
    assert all(row[5].endswith("x") for row in data)
    assert "MI-MAE (N = 4" in run.stdout and "ours in bf16 / the official step" in run.stdout
    saved = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert {r["row"] for r in saved} == {"data 1", "data 2", "bf16, MI-MAE vs MAE", "fp16", "fp32, TF32 on/off",
                                         "official, bf16", "official, fp16", "bf16, compiled"}


def test_official_rows_are_skipped_saying_how_without_a_checkout(tmp_path):
    rows = dict(gpu_check.plan(gpu_check.DRY, torch.device("cpu"), "", "", True, tmp_path))
    runner = gpu_check.Runner(60, torch.device("cpu"))
    runner.run("official, bf16", rows["official, bf16"])
    assert runner.outcomes["official, bf16"] == "skipped: no official checkout (MAE= unset)"
    assert any("git clone https://github.com/facebookresearch/mae" in line for line in gpu_check.targets(runner, gpu_check.DRY))
    runner.run("official, fp16", dict(gpu_check.plan(gpu_check.DRY, torch.device("cpu"), str(tmp_path / "none"), "",
                                                     True, tmp_path))["official, fp16"])
    assert "no folder" in runner.outcomes["official, fp16"]


def test_rows_out_of_time_are_skipped_and_a_running_one_is_stopped():
    runner = gpu_check.Runner(0.2, torch.device("cpu"))
    runner.run("slow", lambda: [sum(range(10**5)) for _ in range(10**4)])
    runner.run("next", lambda: [])
    assert runner.outcomes["slow"].startswith("failed: OutOfTime") and runner.outcomes["next"].startswith("skipped: time budget")


def test_the_gpu_plan_passes_flags_the_tools_accept_and_fills_the_table(monkeypatch, tmp_path, capsys):
    """The real run, with the tools replaced by stand-ins that parse each row's flags with the tools' own parsers
    and answer figures of the tools' shape: what the GPU rows ask for and how the table shows it."""
    calls = []

    def fake_benchmark(argv):
        configs = benchmark.parse_configurations(benchmark.get_args_parser(), argv)
        calls.append(("benchmark", configs))
        if configs[0].mode == "data":
            return [{"img_per_s": rate * c.num_workers, "img_per_s_per_worker": rate, "epoch_startup_s": 1.5,
                     **({"vs_official": 2.5} if rate == 160.0 else {})} for c in configs for rate in (160.0, 64.0)]
        return [{"model": c.model, "batch_size": c.batch_size, "input_size": 224, "precision": c.precision,
                 "img_per_s": 3000.0 / (2 if c.precision == "fp32" and not c.tf32 else 1), "mfu": 0.3,
                 "peak_mem_mb": 40000.0, "tf32": c.tf32, "compile": c.compile, "train_gflops_per_image": 58.7,
                 "peak_tflops": 989.0, "peak_source": "datasheet H200 bf16 dense"} for c in configs]

    def fake_compare(argv):
        args = compare_official.get_args_parser().parse_args(argv)
        calls.append(("compare", args))
        return {"model": args.model, "batch_size": args.batch_size, "input_size": 224, "precision": args.precision,
                "ours_img_per_s": 3000.0, "official_img_per_s": 1200.0, "ratio": 2.5, "median_round_ratio": 2.4,
                "ours_peak_mem_mb": 40000.0, "official_peak_mem_mb": 50000.0}

    monkeypatch.setattr(gpu_check.benchmark, "main", fake_benchmark)
    monkeypatch.setattr(gpu_check.compare_official, "main", fake_compare)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.delenv("CI", raising=False)
    (tmp_path / "mae").mkdir()
    outcome = gpu_check.main(["--official_path", str(tmp_path / "mae"), "--data_path", str(tmp_path)])
    assert not outcome["dry"] and set(outcome["outcomes"].values()) == {"ok"}
    out = capsys.readouterr().out
    rows = table_rows(out, documented_gpu_table_header())
    assert [row[3] for row in rows] == ["bf16", "bf16", "fp16 (GradScaler)", "fp32, TF32", "fp32, no TF32", "bf16",
                                        "fp16 (GradScaler)", "bf16, `--compile`"]
    assert rows[0][:3] == ["H200", "`mae_vit_base_patch16`, 224 px", "256"] and rows[0][8] == "39.1 GB"
    assert rows[1][1:3] == ["`mi_mae_vit_base_patch16`, 224 px, N = 4", "64"]
    assert rows[5][6:8] == ["1,200.0", "**2.50**"] and rows[5][5] == "17.8%"  # 3000 x 58.7 GFLOP / 989 TFLOP/s
    data = table_rows(out, "| workers | ours images/s | per worker | official images/s | per worker | ours / official | start-up (ours, official) |")
    assert [row[:6] for row in data] == [["8", "1,280", "160", "512", "64", "2.50x"], ["16", "2,560", "160", "1,024", "64", "2.50x"]]
    trains = [c for kind, c in calls if kind == "benchmark" and c[0].mode == "train"]
    assert all(c.device == "cuda" and c.steps == 20 and c.warmup == 5 and c.peak_tflops is None for cs in trains for c in cs)
    assert all(args.device == "cuda" and args.official_precision == "fp16" for kind, args in calls if kind == "compare")
    datas = [cs[0] for kind, cs in calls if kind == "benchmark" and cs[0].mode == "data"]
    assert [(c.num_workers, c.batches, c.input_size, c.rounds) for c in datas] == [(8, 32, None, 2), (16, 64, None, 2)]


@pytest.mark.parametrize("flag", ["--dry-run", "--dry_run"])
def test_dry_flag_spellings(flag):
    assert gpu_check.get_args_parser().parse_args([flag]).dry_run
