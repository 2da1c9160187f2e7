"""Collectives per training step of each method on 2 gloo ranks (CPU), counted from a torch.profiler trace.

    .venv/bin/python tools/count_collectives.py                 # every pattern; a markdown table on stdout
    .venv/bin/python tools/count_collectives.py --patterns mi_mae --json counts.json

Each pattern pre-trains a tiny model (vit_tiny_patch4, 32 px, batch 4 per rank) twice under torchrun, for 2 and
for 4 optimizer steps, with the whole run inside the profiler; the count per step is the difference divided by
2, so the set-up (DDP's first broadcast, the resume choice, the epoch's log all-reduce, the final barrier) drops
out. The profiler names each collective as the backend runs it ("gloo:all_reduce", "gloo:all_gather", ...),
DDP's gradient buckets included. On NCCL the same calls run, under "nccl:" names.
"""
import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PATTERNS = {
    "mae": ["--model", "mae_vit_tiny_patch4"],
    "mi_mae": ["--model", "mi_mae_vit_tiny_patch4"],
    "mi_mae_mask_level": ["--model", "mi_mae_vit_tiny_patch4", "--club_level", "mask"],
    "cmae": ["--model", "cmae_vit_tiny_patch4"],
    "u_mae": ["--model", "u_mae_vit_tiny_patch4"],
    "m_mae": ["--model", "m_mae_vit_tiny_patch4"],
}
BATCH_PER_RANK, RANKS = 4, 2


def tiny_image_folder(root: Path) -> Path:
    """64 random 32x32 PNG images in two class folders: enough for 4 steps of 2 ranks x 4 (the online probe's labels)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        folder = root / "train" / label
        folder.mkdir(parents=True)
        for i in range(32):
            Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def count_in_this_rank(argv: list[str]) -> None:
    """Worker (under torchrun): run main_pretrain.main in the profiler; rank 0 writes the backend's collective
    counts as JSON to $COLLECTIVES_OUT."""
    from torch.profiler import ProfilerActivity, profile

    import main_pretrain
    from util.config import parse_with_config

    args = parse_with_config(main_pretrain.get_args_parser(), argv)
    with profile(activities=[ProfilerActivity.CPU]) as trace:
        main_pretrain.main(args)
    counts = collections.Counter(event.name for event in trace.events() if event.name.startswith(("gloo:", "nccl:")))
    if os.environ.get("RANK") == "0":
        Path(os.environ["COLLECTIVES_OUT"]).write_text(json.dumps(counts))


def collective_counts(flags: list[str], data: Path, work: Path, steps: int) -> collections.Counter:
    """{collective: count} of a whole 2-rank run of `steps` optimizer steps, counted on rank 0."""
    out = work / f"steps{steps}.json"
    argv = [*flags, "--data_path", str(data), "--output_dir", str(work / f"run{steps}"), "--input_size", "32",
            "--batch_size", str(BATCH_PER_RANK), "--subset_size", str(steps * BATCH_PER_RANK * RANKS), "--epochs", "1",
            "--warmup_epochs", "0", "--num_workers", "0", "--amp", "none", "--vis_freq", "0", "--print_freq", "1000",
            "--device", "cpu", "--online_probe", "true"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "COLLECTIVES_OUT": str(out)}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(RANKS), "--master_port",
                    str(_free_port()), __file__, "--worker", *argv], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return collections.Counter(json.loads(out.read_text()))


def collectives_per_step(flags: list[str], data: Path, work: Path) -> dict[str, float]:
    """{collective: count per optimizer step} of one pattern, from runs of 2 and 4 steps."""
    two, four = (collective_counts(flags, data, work, steps) for steps in (2, 4))
    return {name: (four[name] - two[name]) / 2 for name in sorted(set(two) | set(four))}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        count_in_this_rank(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="main_pretrain.py flags added to every pattern")
    parser.add_argument("--json", default="", help="also write {pattern: {collective: per step}} here")
    options = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = tiny_image_folder(Path(tmp) / "data")
        for name in options.patterns:
            work = Path(tmp) / name
            work.mkdir()
            results[name] = collectives_per_step(PATTERNS[name] + options.extra, data, work)
    kinds = sorted({kind for counts in results.values() for kind in counts})
    print("| pattern | " + " | ".join(kinds) + " | total |\n|---|" + "---|" * (len(kinds) + 1))
    for name, counts in results.items():
        print(f"| {name} | " + " | ".join(f"{counts.get(kind, 0):g}" for kind in kinds) + f" | {sum(counts.values()):g} |")
    if options.json:
        Path(options.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
