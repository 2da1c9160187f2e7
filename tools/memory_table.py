"""docs/PRETRAIN.md's V100 memory table: for each ImageNet pre-training preset, the largest per-GPU batch that fits a
16 GB and a 32 GB V100 in fp16, with and without --grad_checkpointing, and the --accum_iter that then keeps the
preset's effective batch on 8 GPUs.

    python tools/memory_table.py            # ~4 minutes on 2 CPU cores; prints the markdown table

Each figure comes from util/memory.py: what autograd saves in one forward, counted on the CPU in bf16 (2 bytes
per value, as fp16 on the GPU), times (1 + TRANSIENT), plus 18 bytes per parameter and the CUDA context.
tests/test_memory.py checks that count against the CPU's measured peak.
"""
import argparse
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import main_pretrain  # noqa: E402  (the presets are main_pretrain.py's; its parser resolves them)
from util.batch import plan_batch  # noqa: E402
from util.config import parse_with_config  # noqa: E402
from util.memory import count_step_memory  # noqa: E402
from util.registry import create_model, method_for  # noqa: E402

V100_BYTES = {"16 GB": 16 * 10**9 * 0.98, "32 GB": 32 * 10**9 * 0.98}  # what a V100 offers after ECC and the driver
GPUS = 8


def presets() -> list[Path]:
    return sorted(p for p in (ROOT / "configs").glob("*/pretrain_*in1k*.yaml"))


def resolve(preset: Path) -> argparse.Namespace:
    return parse_with_config(main_pretrain.get_args_parser(), ["--config", str(preset), "--data_path", "."])


def per_gpu_plan(max_batch: int, effective: int) -> str:
    """The largest power-of-two batch <= max_batch that divides the per-GPU share, and its --accum_iter."""
    share = effective // GPUS
    batch = 1
    while batch * 2 <= min(max_batch, share) and share % (batch * 2) == 0:
        batch *= 2
    return f"{max_batch} ({batch} x {share // batch})" if max_batch >= 1 else "does not fit"


# What changes the activations and parameters: the architecture, the masks, and which heads exist (a loss of
# weight 0 builds none); temperatures, learning rates and the like do not.
SHAPING = ("img_size", "mask_ratio", "num_masks", "mask_mode", "mi_proj", "mi_feat", "club_level", "v_hidden",
           "decoder_depth", "decoder_embed_dim", "decoder_num_heads", "pos_task", "rec_views")
HEAD_WEIGHTS = ("w_max", "w_min", "w_v", "con_weight", "pos_weight")


def memory_key(model: str, kwargs: dict) -> tuple:
    return (model, *((k, kwargs[k]) for k in SHAPING if k in kwargs), *((k, kwargs[k] > 0) for k in HEAD_WEIGHTS if k in kwargs))


def count(job: tuple[str, dict, int]):
    model, kwargs, input_size = job
    torch.manual_seed(0)
    return count_step_memory(create_model(model, **kwargs), input_size, torch.bfloat16, 1)


def table() -> list[str]:
    lines = ["| preset | model, masks | preset batch per GPU x accum (8 GPUs) | 16 GB | 16 GB, checkpointing | 32 GB | "
             "32 GB, checkpointing |", "|---|---|---|---|---|---|---|"]
    resolved = [(preset, resolve(preset)) for preset in presets()]
    jobs = {}
    for _, args in resolved:
        kwargs = method_for(args.model).model_kwargs(args)
        jobs.setdefault(memory_key(args.model, kwargs), (args.model, kwargs, args.input_size))
    # one fresh process per count: the allocator's fragmentation after a large model's forward would otherwise
    # pile up over twenty models (21 GB seen)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1) as pool:
        counted = dict(zip(jobs, pool.map(count, jobs.values())))
    for preset, args in resolved:
        memory = counted[memory_key(args.model, method_for(args.model).model_kwargs(args))]
        plan = plan_batch(args.effective_batch, GPUS, args.batch_size, args.accum_iter, main_pretrain.whole_batch_of(args))
        effective = plan.effective
        masks = f", N = {args.num_masks}" if args.model.startswith("mi_mae_") else ""
        cells = [per_gpu_plan(memory.max_batch(capacity, ckpt), effective)
                 for capacity in V100_BYTES.values() for ckpt in (False, True)]
        lines.append(f"| `{preset.relative_to(ROOT / 'configs')}` | `{args.model}`{masks} | {plan.batch_size} x "
                     f"{plan.accum_iter} = {effective} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print("\n".join(table()))
