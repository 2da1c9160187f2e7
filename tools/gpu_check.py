"""The GPU check of docs/PERFORMANCE.md in one run, for one H100/H200 in under 8 minutes (run it through
tools/gpu_check.sh). Every figure comes from tools/benchmark.py and tools/compare_official.py, called in this one
process (one start-up), row after row:

- the data pipeline (`benchmark.py --mode data`) with 8 and 16 workers, at 224 px with MAE's transform, on the
  image folder of --data_path ($DATA), else on ImageNet-sized JPEGs made by tools/make_benchmark_jpegs.py, ours
  against the official pipeline, interleaved;
- the training step of MAE ViT-B/16 in each precision, at batch 256: bf16; fp16 with its GradScaler; fp32 with and
  without TF32 (one interleaved --vs run); each row with its MFU and peak memory;
- MI-MAE (N = 4) at batch 64 interleaved with MAE at 256 (the same sequences per step): time per image;
- ours against the official step (compare_official.py: bf16 against their fp16 engine, and fp16 against fp16),
  when --official_path ($MAE) names a checkout of facebookresearch/mae; skipped, saying how, when not;
- the compiled step (--compile, interleaved with eager), last, as its compilation takes the longest.

stdout gets the markdown tables only (the GPU table of docs/PERFORMANCE.md, the data table, a list of the targets);
the tools' own lines go to stderr. A row that fails is reported in the table and the next one runs; a row not
started within --budget_s is skipped, and a running one is stopped at it.

--dry-run (or no CUDA GPU, or $CI set) runs the same rows on the CPU with tiny settings (the tiny models at 16 px,
batch 4, one timed step, torch.compile as a no-op), in seconds: the tables' shape, not figures.
"""
import argparse
import contextlib
import datetime
import gc
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools import benchmark, compare_official  # noqa: E402
from tools.make_benchmark_jpegs import make_set  # noqa: E402

OFFICIAL_HOW = ("the official rows need a checkout of facebookresearch/mae: `git clone https://github.com/facebookresearch/mae` "
                "on a machine with access, copy it over, and pass MAE=/path/to/mae (or --official_path)")
NO_OFFICIAL = "no official checkout"


@dataclass(frozen=True)
class Settings:
    model: str
    mi_model: str
    batch_size: int
    mi_batch_size: int  # N = 4 sequences per image: the same sequences per step as MAE at batch_size
    input_size: Optional[int]  # None: the model's own (224 px)
    steps: int
    warmup: int
    peak_tflops: Optional[float]  # None: datasheet (H100/H200) or measured
    workers: tuple[int, ...]
    data_batch_size: int
    data_rounds: int  # interleaved rounds of ours and the official pipeline


GPU = Settings("mae_vit_base_patch16", "mi_mae_vit_base_patch16", 256, 64, None, 20, 5, None, (8, 16), 64, 2)
DRY = Settings("mae_vit_tiny_patch4", "mi_mae_vit_tiny_patch4", 4, 1, 16, 1, 1, 1.0, (1, 2), 4, 1)
BATCHES_PER_WORKER = 4  # timed batches per worker: each worker delivers several, so start-up and prefetch even out


class SkipRow(Exception):
    pass


class OutOfTime(Exception):
    pass


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("One GPU check: the tables of docs/PERFORMANCE.md",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="tiny settings on the CPU, in seconds: the tables' shape (also without a CUDA GPU, or with $CI set)")
    parser.add_argument("--official_path", default=os.environ.get("MAE", ""),
                        help="a checkout of github.com/facebookresearch/mae (default $MAE); without it the official rows are skipped")
    parser.add_argument("--data_path", default=os.environ.get("DATA", ""),
                        help="image folder for the data rows (default $DATA); without it, synthetic ImageNet-sized JPEGs made here")
    parser.add_argument("--budget_s", default=450, type=float,
                        help="seconds: rows not started by then are skipped, a running one is stopped then")
    parser.add_argument("--json", default="", help="also write every row's results to this file (JSON lines)")
    return parser


# --- running the rows ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def deadline(seconds: float):
    """Raise OutOfTime in the main thread after `seconds` (SIGALRM; where there is none, no limit)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def stop(signum, frame):
        raise OutOfTime(f"stopped at the time budget ({seconds:.0f} s left when it started)")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Runner:
    """Runs the rows one after another, each within what is left of the budget; keeps results and outcomes."""

    def __init__(self, budget_s: float, device: torch.device):
        self.start, self.budget_s, self.device = time.monotonic(), budget_s, device
        self.results: dict[str, object] = {}
        self.outcomes: dict[str, str] = {}  # name -> "ok", "skipped: ...", "failed: ..."

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def run(self, name: str, fn: Callable[[], object]) -> None:
        left = self.budget_s - self.elapsed()
        if left <= 0:
            self.outcomes[name] = f"skipped: time budget ({self.budget_s:.0f} s) spent"
            return
        print(f"=== {name} ({self.elapsed():.0f} s elapsed)", file=sys.stderr, flush=True)
        try:
            with deadline(left), contextlib.redirect_stdout(sys.stderr):
                self.results[name] = fn()
            self.outcomes[name] = "ok"
        except SkipRow as reason:
            self.outcomes[name] = f"skipped: {reason}"
        except (Exception, SystemExit, OutOfTime) as err:  # a tool's SystemExit names its error
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            self.outcomes[name] = f"failed: {type(err).__name__}: {message}"[:200]
        finally:
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"=== {name}: {self.outcomes[name]}", file=sys.stderr, flush=True)


def train_argv(s: Settings, device: torch.device, *flags: str) -> list[str]:
    argv = ["--model", s.model, "--batch_size", str(s.batch_size), "--steps", str(s.steps), "--warmup", str(s.warmup),
            "--device", device.type, *flags]
    if s.input_size:
        argv += ["--input_size", str(s.input_size)]
    if s.peak_tflops:
        argv += ["--peak_tflops", str(s.peak_tflops)]
    return argv


def plan(s: Settings, device: torch.device, official_path: str, data_path: str, dry: bool,
         scratch: Path) -> list[tuple[str, Callable[[], object]]]:
    """The rows in the order they run: the data pipeline first (before CUDA is initialised in this process, whose
    workers fork from it), the compiled step last."""
    rows: list[tuple[str, Callable[[], object]]] = []
    largest = max(s.workers)
    images_needed = (BATCHES_PER_WORKER * largest + 1) * s.data_batch_size

    def data_folder() -> str:
        return data_path or str(make_set(scratch / "images", images_needed))

    for workers in s.workers:
        rows.append((f"data {workers}", lambda w=workers: benchmark.main([
            "--mode", "data", "--dataset", "imagefolder", "--data_path", data_folder(), "--model", s.model,
            "--batch_size", str(s.data_batch_size), "--num_workers", str(w), "--batches", str(BATCHES_PER_WORKER * w),
            "--rounds", str(s.data_rounds),
            *(["--input_size", str(s.input_size)] if s.input_size else [])])))
    rows.append(("bf16, MI-MAE vs MAE", lambda: benchmark.main(train_argv(
        s, device, "--precision", "bf16", "--model", s.mi_model, "--batch_size", str(s.mi_batch_size),
        "--vs", f"model={s.model}", "--vs", f"batch_size={s.batch_size}"))))
    rows.append(("fp16", lambda: benchmark.main(train_argv(s, device, "--precision", "fp16"))))
    rows.append(("fp32, TF32 on/off", lambda: benchmark.main(train_argv(s, device, "--precision", "fp32", "--vs", "tf32=false"))))

    def official(precision: str) -> Callable[[], object]:
        def run() -> object:
            if not official_path or not Path(official_path).is_dir():
                raise SkipRow(f"{NO_OFFICIAL} ({'MAE= unset' if not official_path else 'no folder ' + official_path})")
            argv = ["--official_path", official_path, "--model", s.model, "--batch_size", str(s.batch_size),
                    "--precision", precision, "--official_precision", "fp16", "--steps", str(s.steps),
                    "--warmup", str(s.warmup), "--device", device.type]
            return compare_official.main(argv + (["--input_size", str(s.input_size)] if s.input_size else []))
        return run

    rows.append(("official, bf16", official("bf16")))
    rows.append(("official, fp16", official("fp16")))

    def compiled() -> object:
        if dry:  # inductor needs minutes on a CPU: the dry run times the same code with compilation a no-op
            torch._dynamo.config.disable = True
        return benchmark.main(train_argv(s, device, "--precision", "bf16", "--vs", "compile=true"))

    rows.append(("bf16, compiled", compiled))
    return rows


# --- the tables ----------------------------------------------------------------------------------------------------
def _memory(mb: Optional[float]) -> str:
    if mb is None:
        return "-"
    return f"{mb / 1024:.1f} GB" if mb >= 1024 else f"{mb:.0f} MB"


def _model_cell(result: dict, extra: str = "") -> str:
    model = result["model"]
    cell = f"`{model}`, {result['input_size']} px"
    if model.startswith("mi_mae"):
        cell += ", N = 4"
    return cell + extra


def _precision_cell(result: dict) -> str:
    precision = result["precision"]
    if precision == "fp16":
        return "fp16 (GradScaler)"
    if precision == "fp32":
        return "fp32, TF32" if result.get("tf32") else "fp32, no TF32"
    return precision + (", `--compile`" if result.get("compile") else "")


def _short_device(name: str) -> str:
    return name.removeprefix("NVIDIA ")


def gpu_table(runner: Runner, s: Settings, device_name: str) -> list[str]:
    header = ["device", "model", "batch", "precision", "ours img/s", "MFU", "official img/s (fp16 AMP)", "ratio", "peak mem"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    device = _short_device(device_name)

    def row(*cells) -> None:
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")

    def benchmark_row(result: dict, extra: str = "") -> None:
        row(device, _model_cell(result, extra), result["batch_size"], _precision_cell(result), f"{result['img_per_s']:,.1f}",
            f"{100 * result['mfu']:.1f}%", "-", "-", _memory(result["peak_mem_mb"]))

    def not_run(name: str, model: str, batch: int, precision: str) -> None:
        row(device, model, batch, precision, runner.outcomes.get(name, "not run"), "-", "-", "-", "-")

    size = f"{s.input_size or 224} px"
    results = runner.results
    if "bf16, MI-MAE vs MAE" in results:
        mi, mae = results["bf16, MI-MAE vs MAE"]
        benchmark_row(mae)
        benchmark_row(mi)
    else:
        not_run("bf16, MI-MAE vs MAE", f"`{s.model}` and `{s.mi_model}`, {size}", s.batch_size, "bf16")
    if "fp16" in results:
        benchmark_row(results["fp16"][0])
    else:
        not_run("fp16", f"`{s.model}`, {size}", s.batch_size, "fp16 (GradScaler)")
    if "fp32, TF32 on/off" in results:
        for result in results["fp32, TF32 on/off"]:
            benchmark_row(result)
    else:
        not_run("fp32, TF32 on/off", f"`{s.model}`, {size}", s.batch_size, "fp32, TF32 and not")
    for name, precision in (("official, bf16", "bf16"), ("official, fp16", "fp16 (GradScaler)")):
        if name not in results:
            not_run(name, f"`{s.model}`, {size}, vs official (their engine)", s.batch_size, precision)
            continue
        result = results[name]
        mfu = _mfu(results, result["model"], result["precision"], result["ours_img_per_s"])
        row(device, f"`{result['model']}`, {result['input_size']} px, vs official (their engine)", result["batch_size"], precision,
            f"{result['ours_img_per_s']:,.1f}", mfu, f"{result['official_img_per_s']:,.1f}", f"**{result['ratio']:.2f}**",
            f"{_memory(result['ours_peak_mem_mb'])} (theirs {_memory(result['official_peak_mem_mb'])})")
    if "bf16, compiled" in results:
        benchmark_row(results["bf16, compiled"][1])
    else:
        not_run("bf16, compiled", f"`{s.model}`, {size}", s.batch_size, "bf16, `--compile`")
    return lines


def _benchmark_results(results: dict) -> list[dict]:
    return [r for value in results.values() if isinstance(value, list) for r in value if "mfu" in r]


def _mfu(results: dict, model: str, precision: str, img_per_s: float) -> str:
    """MFU at `img_per_s`, from the FLOPs and peak that a benchmark row of the same model and precision used."""
    for result in _benchmark_results(results):
        if result["model"] == model and result["precision"] == precision:
            return f"{100 * img_per_s * result['train_gflops_per_image'] / (result['peak_tflops'] * 1000):.1f}%"
    return "-"


def data_table(runner: Runner, s: Settings, source: str) -> list[str]:
    size = s.input_size or 224
    lines = [f"Data pipeline (`tools/benchmark.py --mode data`): `{s.model}` transform at {size} px (random resized crop "
             f"0.2-1, bicubic, flip), ours (`--data_pipeline fast`, with mask noise) against the official one "
             f"(ImageFolder, PIL, ToTensor, Normalize), batch {s.data_batch_size}, {BATCHES_PER_WORKER} batches per worker "
             f"timed after the first, median of {s.data_rounds} interleaved rounds; images: {source}.", "",
             "| workers | ours images/s | per worker | official images/s | per worker | ours / official | start-up (ours, official) |",
             "|---|---|---|---|---|---|---|"]
    for workers in s.workers:
        name = f"data {workers}"
        if name in runner.results and len(runner.results[name]) == 2:
            ours, official = runner.results[name]
            lines.append(f"| {workers} | {ours['img_per_s']:,.0f} | {ours['img_per_s_per_worker']:,.0f} | "
                         f"{official['img_per_s']:,.0f} | {official['img_per_s_per_worker']:,.0f} | "
                         f"{ours['vs_official']:.2f}x | {ours['epoch_startup_s']:.2f} s, {official['epoch_startup_s']:.2f} s |")
        else:
            lines.append(f"| {workers} | {runner.outcomes.get(name, 'not run')} | - | - | - | - | - |")
    return lines


def targets(runner: Runner, s: Settings) -> list[str]:
    results, lines = runner.results, []

    def ratio(name: str) -> Optional[float]:
        pair = results.get(name)
        return pair[1]["img_per_s"] / pair[0]["img_per_s"] if pair else None

    if "bf16, MI-MAE vs MAE" in results:
        mi, mae = results["bf16, MI-MAE vs MAE"]
        lines.append(f"- MFU of MAE in bf16: {100 * mae['mfu']:.1f}% (target >= 45% on an H100 at batch >= 256; peak: "
                     f"{mae['peak_source']}, {mae['peak_tflops']} TFLOP/s)")
        lines.append(f"- MI-MAE (N = 4, batch {mi['batch_size']}) time per image / MAE's (batch {mae['batch_size']}, the "
                     f"same sequences per step), interleaved: {mae['img_per_s'] / mi['img_per_s']:.2f} (target <= 4.2)")
    if "official, bf16" in results:
        lines.append(f"- ours in bf16 / the official step with its fp16 AMP: {results['official, bf16']['ratio']:.2f}x "
                     f"(per-round median {results['official, bf16']['median_round_ratio']:.2f}; target >= 2)")
    if (tf32 := ratio("fp32, TF32 on/off")) is not None:
        lines.append(f"- fp32 step, TF32 on / off: {1 / tf32:.2f}x")
    if (compiled := ratio("bf16, compiled")) is not None:
        lines.append(f"- bf16 step, `--compile` on / off: {compiled:.2f}x")
    if any(NO_OFFICIAL in outcome for outcome in runner.outcomes.values()):
        lines.append(f"- {OFFICIAL_HOW}")
    lines.append(f"- wall time {runner.elapsed():.0f} s (budget {runner.budget_s:.0f} s); torch {torch.__version__}, "
                 f"timm {timm.__version__}, {datetime.date.today().isoformat()}")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = get_args_parser().parse_args(argv)
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here: running the dry mode (tiny settings on the CPU)", file=sys.stderr)
        dry = True
    if not dry and os.environ.get("CI"):
        print("gpu_check: $CI is set: running the dry mode (unset CI to use the GPU)", file=sys.stderr)
        dry = True
    settings = DRY if dry else GPU
    device = torch.device("cpu" if dry else "cuda")
    if dry:
        torch.set_num_threads(1)  # tiny shapes: one thread is fastest, and leaves the other cores alone
    runner = Runner(args.budget_s, device)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        for name, fn in plan(settings, device, args.official_path, args.data_path, dry, Path(scratch)):
            runner.run(name, fn)
    device_name = benchmark.device_name(device)
    source = (f"`{args.data_path}`" if args.data_path else
              f"{(BATCHES_PER_WORKER * max(settings.workers) + 1) * settings.data_batch_size:,} ImageNet-sized JPEGs "
              f"made by tools/make_benchmark_jpegs.py (DATA= for real ones)")
    title = "dry run on the CPU, tiny settings: the shape, not figures" if dry else device_name
    print("\n".join([f"## GPU check: {title}", "", *gpu_table(runner, settings, device_name), "",
                     *data_table(runner, settings, source), "", *targets(runner, settings)]))
    if args.json:
        with open(args.json, "w") as out:
            for name, value in runner.results.items():
                for result in value if isinstance(value, list) else [value]:
                    out.write(json.dumps({"row": name, **result}) + "\n")
    return {"dry": dry, "outcomes": runner.outcomes, "results": runner.results}


if __name__ == "__main__":
    main()
