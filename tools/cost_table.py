"""The cost table of docs/SLURM.md: every ImageNet-scale preset as `--dry_run` resolves it on --gpus GPUs.

    python tools/cost_table.py                 # 32 GPUs (4 nodes x 8), rewrites the table in docs/SLURM.md
    python tools/cost_table.py --gpus 64 --print

Each row builds the preset's model on the CPU and counts its FLOPs and memory (util/dry_run.py): about 10 s a
row, 5-8 minutes for the whole table on 2 cores.
"""
import argparse
import multiprocessing
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import engine_finetune  # noqa: E402
import main_finetune  # noqa: E402
import main_linprobe  # noqa: E402
import main_pretrain  # noqa: E402
from util.config import parse_with_config  # noqa: E402
from util.dry_run import GPU_TYPES, MFU, estimate, format_hours  # noqa: E402

DOC = ROOT / "docs" / "SLURM.md"
BEGIN, END = "<!-- cost table: begin (tools/cost_table.py) -->", "<!-- cost table: end -->"
SCRIPTS = {"pretrain": main_pretrain, "finetune": main_finetune, "linprobe": main_linprobe}


def imagenet_presets() -> list[Path]:
    return sorted(p for p in (ROOT / "configs").glob("*/*.yaml") if "_in1k" in p.name or "tiny_imagenet" in p.name)


def row(preset: Path, gpus: int) -> str:
    kind = preset.name.split("_")[0]
    module = SCRIPTS[kind]
    args = parse_with_config(module.get_args_parser(), ["--config", str(preset)])
    if kind == "pretrain":
        model, whole = main_pretrain.build_model(args), main_pretrain.whole_batch_of(args)
    else:
        model, whole = engine_finetune.model_to_price(args), None
    name = f"`{preset.relative_to(ROOT / 'configs')}`"
    try:
        run = estimate(args, gpus, list(GPU_TYPES.values()), model, kind, whole)
    except ValueError as err:
        return f"| {name} | refused: {err} |||||||"
    v100 = run.costs[0]
    memory = "frozen" if v100.memory_bytes is None else f"{v100.memory_bytes / 2**30:.1f}" + ("" if v100.fits else " (no)")
    hours = " | ".join(format_hours(cost.gpu_hours) for cost in run.costs)
    return (f"| {name} | {run.epochs} | {run.plan.batch_size} x {run.plan.accum_iter} = {run.plan.effective} | "
            f"{run.lr:.2e} | {v100.precision} | {memory} | {run.step_flops / 1e9:.0f} | {hours} |")


def row_in_fresh_process(job: tuple[Path, int]) -> str:
    return row(*job)


def table(gpus: int) -> str:
    header = (f"On {gpus} GPUs; memory per GPU as counted for a V100 (fp16); GPU-hours at the MFU calibrated on MAE's "
              f"published times ({', '.join(f'{k} {v:.1%}' for k, v in MFU.items())}): estimates, none measured.\n\n"
              f"| preset | epochs | per-GPU batch x accum = effective | lr | V100 precision | V100 GiB | GFLOP/image step | "
              f"V100 GPU-h | A100 GPU-h | H100 GPU-h |\n|---|---|---|---|---|---|---|---|---|---|")
    # one fresh process per row: the allocator's fragmentation after large models' forwards piles up otherwise
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1) as pool:
        rows = list(pool.map(row_in_fresh_process, [(preset, gpus) for preset in imagenet_presets()]))
    return "\n".join([header, *rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", default=32, type=int, help="world size of every row")
    parser.add_argument("--print", action="store_true", help="print the table instead of rewriting docs/SLURM.md")
    args = parser.parse_args()
    text = table(args.gpus)
    if args.print:
        print(text)
        return
    doc = DOC.read_text()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{DOC}: no {BEGIN} ... {END} markers to write the table between")
    DOC.write_text(re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: f"{BEGIN}\n{text}\n{END}", doc, flags=re.S))
    print(f"wrote the table of {len(imagenet_presets())} presets to {DOC}")


if __name__ == "__main__":
    main()
