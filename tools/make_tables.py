"""Result tables from finished runs, beside the published numbers.

    python tools/make_tables.py RUN_ROOT [RUN_ROOT ...] --output results.md --plot_dir plots/

Every folder under the roots holding `args.yaml` and `log.txt` is a run. Its protocol comes from its script:
  - a pre-training run (main_pretrain.py) gives "k-NN" when it logged `test_knn_acc1` (--knn_freq);
  - a linear-probe run (main_linprobe.py) gives "linear probe", a fine-tuning run "fine-tune": the `test_acc1`
    of their last epoch; with --label_fraction F < 1, "linear probe, label fraction F" / "fine-tune, label
    fraction F" (FT1%: F = 0.01), kept apart from the runs on every label. Their method, model, epochs and
    budget are those of the pre-training run whose checkpoint `--finetune` names (its folder's args.yaml and
    log.txt); `--finetune ''` is "random init".
Runs are grouped by dataset, protocol, method (the registry's label: e.g. MI-MAE with its MI losses off is
"MAE x 4 (no MI)"), pre-training model and epochs; each group gives mean ± sample std over its seeds. The
published number is the `reference` of the preset the runs were started from (configs/*/*.yaml), with the
difference to the mean. The budget columns (images and masked sequences seen in pre-training, and the
pre-training wall-clock: the sum of its epochs' `epoch_time_s`, mean over seeds) make equal-compute
comparisons readable next to equal-epoch ones. One PNG per table: top-1 against pre-training
epochs, one line per method, error bars = std.
"""
import argparse
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from util.registry import method_for  # noqa: E402


@dataclass(frozen=True)
class GroupKey:
    dataset: str
    protocol: str
    method: str
    model: str
    epochs: int


@dataclass
class Group:
    values: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    images_seen: Optional[int] = None
    sequences_seen: Optional[int] = None
    train_seconds: list[float] = field(default_factory=list)
    published: Optional[float] = None
    source: str = ""


def read_run(folder: Path) -> tuple[dict, list[dict]]:
    args = yaml.safe_load((folder / "args.yaml").read_text())
    records = [json.loads(line) for line in (folder / "log.txt").read_text().splitlines() if line.strip()]
    return args, records


def protocol_of(args: dict) -> str:
    """The script that wrote `args`: only main_linprobe.py has --cached_features, only main_finetune.py
    --layer_decay, only main_pretrain.py --mask_ratio."""
    # a run on a fraction of the labels (FT1%: --label_fraction 0.01) is its own column, never pooled with the full one
    fraction = float(args.get("label_fraction", 1.0))
    labels = f", label fraction {fraction:g}" if fraction < 1.0 else ""
    if "cached_features" in args:
        return "linear probe" + labels
    if "layer_decay" in args:
        return "fine-tune" + labels
    if "mask_ratio" in args:
        return "k-NN"
    raise ValueError("args.yaml is from none of main_pretrain.py, main_linprobe.py, main_finetune.py")


def dataset_name(args: dict) -> str:
    return f"{args.get('dataset', 'imagefolder')}:{Path(args.get('data_path', '')).name}"


def pretrain_of(args: dict) -> tuple[Optional[dict], list[dict]]:
    """The pre-training run behind a probe / fine-tune run: the folder of its --finetune checkpoint."""
    if not args.get("finetune"):
        return None, []
    folder = Path(args["finetune"]).parent
    if not (folder / "args.yaml").is_file() or not (folder / "log.txt").is_file():
        return {"model": Path(args["finetune"]).name, "epochs": 0}, []  # an external checkpoint
    return read_run(folder)


def collect(roots: list[Path]) -> dict[GroupKey, Group]:
    groups: dict[GroupKey, Group] = {}
    for root in roots:
        for args_file in sorted(root.rglob("args.yaml")):
            folder = args_file.parent
            if not (folder / "log.txt").is_file():
                continue
            args, records = read_run(folder)
            if not records:
                continue
            protocol = protocol_of(args)
            if protocol == "k-NN":
                value = records[-1].get("test_knn_acc1")
                pretrain_args, pretrain_records = args, records
            else:
                value = records[-1].get("test_acc1")
                pretrain_args, pretrain_records = pretrain_of(args)
            if value is None:
                continue
            if pretrain_args is None:
                method, model, epochs = "random init", "-", 0
            else:
                model, epochs = pretrain_args["model"], int(pretrain_args.get("epochs", 0))
                try:
                    method = method_for(model).label(pretrain_args)
                except ValueError:
                    method = "external checkpoint"
            key = GroupKey(dataset_name(args), protocol, method, model, epochs)
            group = groups.setdefault(key, Group())
            group.values.append(float(value))
            group.seeds.append(int(pretrain_args.get("seed", 0)) if pretrain_args else int(args.get("seed", 0)))
            if pretrain_records:
                group.images_seen = pretrain_records[-1].get("images_seen")
                group.sequences_seen = pretrain_records[-1].get("sequences_seen")
                group.train_seconds.append(sum(r.get("epoch_time_s", 0.0) for r in pretrain_records))
            reference = args.get("reference") or {}
            if "value" in reference:
                group.published, group.source = float(reference["value"]), str(reference.get("source", ""))
    return groups


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the std of one value is nan."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def _count(n: Optional[int]) -> str:
    return f"{n:,}" if n is not None else "-"


def duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.2f} h"


def markdown_tables(groups: dict[GroupKey, Group]) -> dict[tuple[str, str], str]:
    """One Markdown table per (dataset, protocol)."""
    tables = {}
    for dataset, protocol in sorted({(k.dataset, k.protocol) for k in groups}):
        lines = [f"### {protocol}, {dataset}", "",
                 "| method | model | epochs | images seen | sequences seen | seeds | top-1 % (mean ± std) | published | Δ "
                 "| pre-train time |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        keys = sorted((k for k in groups if (k.dataset, k.protocol) == (dataset, protocol)),
                      key=lambda k: (k.model, k.epochs, k.method))
        for key in keys:
            group = groups[key]
            mean, std = mean_std(group.values)
            spread = f"{mean:.2f} ± {std:.2f}" if not math.isnan(std) else f"{mean:.2f}"
            published = f"{group.published:.2f}" if group.published is not None else "-"
            delta = f"{mean - group.published:+.2f}" if group.published is not None else "-"
            time = duration(statistics.fmean(group.train_seconds)) if group.train_seconds else "-"
            lines.append(f"| {key.method} | {key.model} | {key.epochs} | {_count(group.images_seen)} | "
                         f"{_count(group.sequences_seen)} | {len(group.values)} | {spread} | {published} | {delta} | {time} |")
        tables[(dataset, protocol)] = "\n".join(lines) + "\n"
    return tables


def plot(groups: dict[GroupKey, Group], dataset: str, protocol: str, path: Path) -> None:
    """Top-1 against pre-training epochs, one line per (method, model), error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    lines = sorted({(k.method, k.model) for k in groups if (k.dataset, k.protocol) == (dataset, protocol)})
    for method, model in lines:
        keys = sorted((k for k in groups if (k.dataset, k.protocol, k.method, k.model) == (dataset, protocol, method, model)),
                      key=lambda k: k.epochs)
        stats = [mean_std(groups[k].values) for k in keys]
        axes.errorbar([k.epochs for k in keys], [m for m, _ in stats], yerr=[0 if math.isnan(s) else s for _, s in stats],
                      marker="o", capsize=3, label=f"{method} ({model})")
    axes.set_xlabel("pre-training epochs")
    axes.set_ylabel("top-1 %")
    axes.set_title(f"{protocol}, {dataset}")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: Optional[list[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("roots", nargs="+", type=Path, help="folders searched recursively for runs")
    parser.add_argument("--output", type=Path, default=None, help="Markdown file to write (default: print)")
    parser.add_argument("--plot_dir", type=Path, default=None, help="folder for one PNG per table (default: none)")
    args = parser.parse_args(argv)
    missing = [str(root) for root in args.roots if not root.is_dir()]
    if missing:
        parser.error(f"no such run folder: {', '.join(missing)}")
    groups = collect(args.roots)
    if not groups:
        parser.error(f"no finished runs (args.yaml + log.txt with a test accuracy) under {', '.join(map(str, args.roots))}")
    tables = markdown_tables(groups)
    text = "\n".join(tables.values())
    if args.plot_dir is not None:
        args.plot_dir.mkdir(parents=True, exist_ok=True)
        for dataset, protocol in tables:
            slug = f"{protocol}_{dataset}".replace(" ", "_").replace(":", "_").replace("/", "_")
            image = args.plot_dir / f"{slug}.png"
            plot(groups, dataset, protocol, image)
            link = os.path.relpath(image, args.output.parent) if args.output is not None else str(image)
            text = text.replace(f"### {protocol}, {dataset}\n", f"### {protocol}, {dataset}\n\n![{protocol}]({link})\n", 1)
    if args.output is not None:
        args.output.write_text(text)
        print(f"wrote {args.output}")
    else:
        print(text)
    return text


if __name__ == "__main__":
    main()
