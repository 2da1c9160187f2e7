"""Every preset under configs/ resolves (with its `_base_` chain) for its script, and starts: one real training
step on the CPU with the preset's model widths, method flags and recipe, depth capped and the data tiny."""
import json
from pathlib import Path

import pytest
import yaml

import main_finetune
import main_linprobe
import main_pretrain
from util.batch import plan_batch
from util.config import load_config, parse_with_config

PRESETS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("**/*.yaml"))
SCRIPTS = {"pretrain": main_pretrain, "finetune": main_finetune, "linprobe": main_linprobe}


def _script(preset: Path):
    return SCRIPTS[preset.name.split("_")[0]]


def test_presets_found():
    assert len(PRESETS) >= 40 and {p.parent.name for p in PRESETS} >= {"mae", "mi_mae", "m_mae"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_preset_parses_and_starts(preset, tiny_imagefolder, tmp_path, shallow_models):
    module = _script(preset)
    header = [line for line in preset.read_text().splitlines() if line.startswith("#")]
    assert any(f"{module.__name__}.py --config configs/{preset.parent.name}/{preset.name}" in line for line in header), \
        "the header comment must give the command that runs this preset"
    values = load_config(str(preset), module.get_args_parser())
    args = parse_with_config(module.get_args_parser(), ["--config", str(preset)])
    assert all(getattr(args, key) == value for key, value in values.items() if key != "reference")
    assert args.reference == values.get("reference")
    if args.reference is not None:  # the published number is also in the header a reader sees
        assert any(f"{args.reference['value']}" in line for line in header)
    tiny = ["--data_path", str(tiny_imagefolder), "--dataset", "imagefolder", "--input_size", "64", "--batch_size", "2",
            "--accum_iter", "1", "--effective_batch", "0", "--epochs", "1", "--subset_size", "2", "--num_workers", "0", "--device", "cpu",
            "--output_dir", str(tmp_path), "--print_freq", "1"]
    if module is main_pretrain:
        tiny += ["--vis_freq", "0", "--knn_freq", "0"]
    else:
        tiny += ["--finetune", ""]
    args = parse_with_config(module.get_args_parser(), ["--config", str(preset), *tiny])
    module.main(args)
    record = json.loads((tmp_path / "log.txt").read_text().splitlines()[-1])
    assert record["epoch"] == 0
    assert yaml.safe_load((tmp_path / "args.yaml").read_text())["model"] == values["model"]


MI_MAE_IMAGENET = sorted(p for p in PRESETS if p.parent.name == "mi_mae" and p.name.startswith("pretrain_") and "_in1k_" in p.name)


def test_mi_mae_imagenet_presets_follow_the_papers_recipe():
    """'The total batch size is 1024 ... a cosine decay learning rate schedule with a 10-epoch warmup and a base
    learning rate of 1.5e-4' (the paper), on the 8 GPUs of each preset's header command, InfoNCE tau 0.07 but for
    the temperature ablations."""
    assert len(MI_MAE_IMAGENET) >= 20
    for preset in MI_MAE_IMAGENET:
        args = parse_with_config(main_pretrain.get_args_parser(), ["--config", str(preset)])
        assert "--nproc_per_node 8 " in preset.read_text(), preset.name
        plan = plan_batch(args.effective_batch, 8, args.batch_size, args.accum_iter)
        assert (plan.effective, args.warmup_epochs, args.blr) == (1024, 10, 1.5e-4), preset.name
        assert (args.weight_decay, args.mask_ratio, args.norm_pix_loss) == (0.05, 0.75, True), preset.name
        if "_tau" not in preset.name:
            assert args.mi_temperature == 0.07, preset.name
    taus = {p.stem.split("_tau")[1]: p for p in MI_MAE_IMAGENET if "_tau" in p.name}
    assert set(taus) >= {"0.2"}


FMNIST_ROWS = sorted(p for p in PRESETS if p.parent.name == "mi_mae" and p.name.startswith("pretrain_vit_tiny_fmnist"))


def test_fashion_mnist_ablation_rows_keep_the_demo_budget_and_change_one_thing():
    """Issue 16's ablation rows at the demo's budget (tools/demo.py): every row is the main row but for the flags
    its ablation varies, and each has its ImageNet twin."""
    from tools.demo import PRETRAIN

    demo_flags = PRETRAIN["mi_mae"] + ["--norm_pix_loss", "--mask_ratio", "0.75", "--input_size", "32", "--epochs", "3",
                                       "--warmup_epochs", "1", "--dataset", "fashion_mnist"]
    demo = parse_with_config(main_pretrain.get_args_parser(), demo_flags)
    varied = {"": {}, "mae_n1": {"num_masks": 1, "w_max": 0.0, "w_min": 0.0, "w_v": 0.0}, "n2": {"num_masks": 2},
              "n3": {"num_masks": 3}, "mae4": {"w_max": 0.0, "w_min": 0.0, "w_v": 0.0},
              "max_only": {"w_min": 0.0, "w_v": 0.0}, "min_only": {"w_max": 0.0}, "w_min0": {"w_min": 0.0},
              "w_min1": {"w_min": 1.0}, "w_min100": {"w_min": 100.0}, "independent": {"mask_mode": "independent"},
              "tau0.2": {"mi_temperature": 0.2}, "club_mask": {"club_level": "mask", "club_candidates": "image"},
              "reading_b": {"w_min": 1.0, "w_v": 10.0}}
    rows = {p.stem.removeprefix("pretrain_vit_tiny_fmnist").removeprefix("_"): p for p in FMNIST_ROWS}
    assert set(rows) == set(varied)
    compared = [a.dest for a in main_pretrain.get_args_parser()._actions
                if a.dest not in ("help", "config", "data_path", "reference", "effective_batch")]
    for name, preset in rows.items():
        args = parse_with_config(main_pretrain.get_args_parser(), ["--config", str(preset)])
        assert args.effective_batch == demo.batch_size, name  # the demo's one process, declared
        differs = {key: getattr(args, key) for key in compared if getattr(args, key) != getattr(demo, key)}
        assert differs == varied[name], name
        if name:
            assert (preset.parent / f"pretrain_vit_base_in1k_400ep_{name}.yaml").is_file(), name
