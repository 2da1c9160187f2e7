"""What a checkpoint inside an epoch costs (docs/RELIABILITY.md): its bytes, counted, and the time this machine takes
to write it atomically (util.checkpoint.save_atomic: temp file, fsync, rename), for the ImageNet pre-training models.

    python tools/save_cost.py --folder /shared/runs      # time the file system the runs write to
    python tools/save_cost.py --models mae_vit_base_patch16 --repeats 5

The state is a run's own: weights, AdamW's two moments (after one step), the GradScaler, args; a mid-epoch save
adds each rank's random state and running sums (a few kB). Rank 0 writes while the other ranks wait at the next
collective, so the save's time is lost on every GPU: the interval that keeps it under 1% is 100 x the write.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from util.checkpoint import save_atomic  # noqa: E402
from util.preempt import rng_state  # noqa: E402
from util.registry import create_model  # noqa: E402

MODELS = ("mae_vit_base_patch16", "mi_mae_vit_base_patch16", "mae_vit_large_patch16")


def run_state(name: str) -> dict:
    model = create_model(name, norm_pix_loss=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()  # AdamW's moments exist, as in any checkpoint after the first step
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": {}, "args": {"model": name},
            "epoch": 0, "mid_epoch": {"epoch": 1, "ranks": [{"step": 100, "rng": rng_state()}]}}


def tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--folder", default=str(ROOT), help="where to write (the test file is removed)")
    parser.add_argument("--repeats", default=3, type=int, help="writes per model; the median is reported")
    args = parser.parse_args()
    print("| model | parameters | checkpoint bytes (counted) | atomic write, median (s) | GB/s | interval for < 1% (min) |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        state = run_state(name)
        size = tensor_bytes(state)
        times = []
        with tempfile.TemporaryDirectory(dir=args.folder) as folder:
            for _ in range(args.repeats):
                start = time.perf_counter()
                save_atomic(state, Path(folder) / "checkpoint-last.pth")
                times.append(time.perf_counter() - start)
            written = (Path(folder) / "checkpoint-last.pth").stat().st_size
        seconds = statistics.median(times)
        params = sum(v.numel() for v in state["model"].values())
        print(f"| `{name}` | {params / 1e6:.0f}M | {size / 1e9:.2f} GB ({written / 1e9:.2f} GB on disk) | {seconds:.1f} "
              f"(of {', '.join(f'{t:.1f}' for t in times)}) | {written / seconds / 1e9:.2f} | {100 * seconds / 60:.1f} |",
              flush=True)
        del state


if __name__ == "__main__":
    main()
