"""--label_fraction (FT1% = 0.01, the MI-MAE paper's Table 1): round(F x n_c) images of every class, halves up,
the same images for every model, script and run of a seed, a different draw for another seed, and a clear
error before training when a class would keep no image; main_linprobe.py and main_finetune.py train on exactly
those images."""
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import datasets as tv_datasets

import main_finetune
import main_linprobe
import engine_finetune
from tools.make_tables import protocol_of
from util.config import parse_with_config
from util.datasets import (
    ArrayImageDataset,
    LabelledImageFiles,
    SeededDataset,
    build_dataset,
    build_transform,
    class_balanced_subset,
    dataset_labels,
    images_per_class,
    subset,
)


def _labelled(counts: dict[int, int], seed: int = 0) -> ArrayImageDataset:
    """An in-memory dataset with counts[c] images of class c, the classes interleaved in a random order."""
    labels = np.concatenate([np.full(n, c) for c, n in counts.items()])
    labels = np.random.default_rng(seed).permutation(labels)
    images = np.zeros((len(labels), 4, 4), dtype=np.uint8)
    images[:, 0, 0] = np.arange(len(labels)) % 256  # unused; the images never matter to the choice
    return ArrayImageDataset(images, labels.astype(np.int64), max(counts) + 1)


@pytest.mark.parametrize("fraction, count, expected", [
    (0.25, 7, 2), (0.25, 10, 3), (0.25, 13, 3),  # 1.75, 2.5 (a half: up), 3.25
    (0.15, 10, 2),  # 1.5 exactly as written (the float product is 1.4999...)
    (0.01, 50, 1), (0.01, 49, 0), (0.01, 6000, 60), (0.01, 1300, 13),  # FT1%: Fashion-MNIST, ImageNet per class
    (1.0, 17, 17), (0.5, 1, 1)])
def test_images_per_class_rounds_halves_up(fraction, count, expected):
    assert images_per_class(fraction, count) == expected


def test_every_class_keeps_its_fraction_of_its_own_images():
    counts = {0: 300, 1: 120, 2: 57, 3: 10}
    dataset = _labelled(counts)
    chosen = class_balanced_subset(dataset, 0.1, seed=0)
    # read the chosen samples themselves, not the helper's labels
    seen = Counter(dataset[i][1] for i in chosen.indices)
    assert seen == {0: 30, 1: 12, 2: 6, 3: 1}  # 5.7 -> 6, 1.0 -> 1
    assert len(set(chosen.indices)) == len(chosen) == 49 and chosen.indices == sorted(chosen.indices)
    assert chosen.num_classes == 4 and Counter(chosen[k][1] for k in range(len(chosen))) == seen
    assert class_balanced_subset(dataset, 1.0, seed=0).indices == list(range(len(dataset)))


def test_same_images_for_a_seed_whatever_the_transform_or_wrapper(tiny_imagefolder):
    """What differs between methods and scripts (transform, model, wrappers) never enters the choice."""
    finetune_view = build_dataset("imagefolder", str(tiny_imagefolder), "train", build_transform(False, 32, "finetune"))
    probe_view = build_dataset("imagefolder", str(tiny_imagefolder), "train", build_transform(True, 32, "linprobe"))
    a = class_balanced_subset(finetune_view, 0.25, seed=3)
    b = class_balanced_subset(probe_view, 0.25, seed=3)
    c = class_balanced_subset(SeededDataset(finetune_view, seed=99), 0.25, seed=3)
    assert a.indices == b.indices == c.indices
    assert Counter(finetune_view.targets[i] for i in a.indices) == {0: 4, 1: 4}  # 16 per class x 0.25


def test_another_seed_draws_other_images_and_fractions_nest():
    dataset = _labelled({0: 200, 1: 200, 2: 200})
    first, again = class_balanced_subset(dataset, 0.05, seed=0), class_balanced_subset(dataset, 0.05, seed=0)
    other = class_balanced_subset(dataset, 0.05, seed=1)
    assert first.indices == again.indices
    assert first.indices != other.indices and len(other) == len(first) == 30
    assert Counter(dataset[i][1] for i in other.indices) == {0: 10, 1: 10, 2: 10}
    # for one seed, the 1% images are among the 5% ones
    assert set(class_balanced_subset(dataset, 0.01, seed=0).indices) <= set(first.indices)


def test_a_class_left_without_images_is_an_error_naming_flag_value_and_class(tiny_imagefolder):
    dataset = _labelled({0: 100, 1: 100, 2: 40})
    with pytest.raises(ValueError) as error:
        class_balanced_subset(dataset, 0.01, seed=0)
    message = str(error.value)
    assert "--label_fraction 0.01" in message and "class 2" in message and "40 training images" in message
    assert "--label_fraction >= 0.0125" in message  # 0.0125 x 40 = 0.5 rounds up to one image
    assert len(class_balanced_subset(dataset, 0.0125, seed=0)) == 1 + 1 + 1
    # several classes left empty: the smallest one is named, and the fraction suggested serves it
    with pytest.raises(ValueError, match=r"round\(0.02 x 10\) = 0 images of class 1 \(and 2 other classes\), which has "
                                         r"10 training images; .* --label_fraction >= 0.05 \(0.5 / 10"):
        class_balanced_subset(_labelled({0: 20, 1: 10, 2: 15, 3: 100}), 0.02, seed=0)
    folder = build_dataset("imagefolder", str(tiny_imagefolder), "train", None)
    with pytest.raises(ValueError, match=r"--label_fraction 0.02 keeps round\(0.02 x 16\) = 0 images of class 0 \('bright'\)"):
        class_balanced_subset(folder, 0.02, seed=0)
    for fraction in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"--label_fraction must lie in \(0, 1\]"):
            class_balanced_subset(dataset, fraction, seed=0)


def test_unlabelled_images_are_refused(tmp_path, tiny_imagefolder):
    unlabelled = build_dataset("imagefolder", str(tiny_imagefolder / "train" / "dark"), "train", None)
    assert (dataset_labels(unlabelled) == -1).all()
    with pytest.raises(ValueError, match="--label_fraction 0.5 .* no labels"):
        class_balanced_subset(unlabelled, 0.5, seed=0)


def test_labels_are_read_without_decoding_and_match_the_samples(tiny_imagefolder):
    folder = build_dataset("imagefolder", str(tiny_imagefolder), "train", None)
    assert isinstance(folder, tv_datasets.ImageFolder)
    expected = np.array([folder[i][1] for i in range(len(folder))])
    assert np.array_equal(dataset_labels(folder), expected)
    part = subset(folder, 10, seed=0)
    assert np.array_equal(dataset_labels(part), expected[part.indices])
    files = LabelledImageFiles([(Path(p), label) for p, label in folder.samples], 2)
    assert np.array_equal(dataset_labels(files), expected)
    array = _labelled({0: 3, 1: 5})
    assert np.array_equal(dataset_labels(SeededDataset(array, seed=0)), [array[i][1] for i in range(8)])


# ------------------------------------------------------------------ the flag in the scripts


@pytest.mark.parametrize("module", [main_linprobe, main_finetune])
@pytest.mark.parametrize("flags, expected", [
    (["--label_fraction", "0"], "--label_fraction must lie in (0, 1] (1: every training image), got 0.0"),
    (["--label_fraction", "1.5"], "--label_fraction must lie in (0, 1] (1: every training image), got 1.5"),
    (["--label_fraction", "0.01", "--subset_size", "100"], "--label_fraction 0.01 and --subset_size 100 both choose"),
    (["--eval_freq", "0"], "--eval_freq must be >= 1 (epochs between evaluations; the last epoch is always evaluated), got 0"),
])
def test_flag_values_refused_before_any_work(module, flags, expected, tiny_imagefolder, capsys):
    parser = module.get_args_parser()
    args = parse_with_config(parser, ["--data_path", str(tiny_imagefolder), *flags])
    with pytest.raises(SystemExit) as exit_info:
        engine_finetune.validate_common_args(args, parser)
    assert exit_info.value.code != 0 and expected in capsys.readouterr().err


@pytest.mark.parametrize("scale", [["0", "1"], ["0.6", "0.5"], ["0.5", "1.2"]])
def test_a_crop_scale_outside_the_unit_interval_is_refused(scale, tiny_imagefolder, capsys):
    parser = main_finetune.get_args_parser()
    args = parse_with_config(parser, ["--data_path", str(tiny_imagefolder), "--crop_scale", *scale])
    with pytest.raises(SystemExit):
        main_finetune.validate_args(args, parser)
    assert f"--crop_scale {float(scale[0]):g} {float(scale[1]):g}: the crop's area range must satisfy 0 < MIN <= MAX <= 1" in capsys.readouterr().err


def test_help_says_what_ft1_is(capsys):
    with pytest.raises(SystemExit):
        main_finetune.get_args_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "FT1% (MI-MAE's Table 1" in text and "--label_fraction 0.01" in text


def _run(module, tiny_imagefolder, out: Path, *flags: str):
    common = ["--data_path", str(tiny_imagefolder), "--input_size", "32", "--batch_size", "4", "--epochs", "1",
              "--warmup_epochs", "0", "--num_workers", "0", "--device", "cpu", "--amp", "none", "--print_freq", "100",
              "--output_dir", str(out), "--auto_resume", "false"]
    module.main(parse_with_config(module.get_args_parser(), [*common, *flags]))


@pytest.fixture
def trained_labels(monkeypatch):
    """Per run, the labels the training loop drew in each epoch, and the images' indices where the loader
    still holds them (the non-cached paths: loader.dataset = SeededDataset(Subset(ImageFolder)))."""
    runs = []
    original = engine_finetune.train_one_epoch

    def recording(model, criterion, data_loader, *args, **kwargs):
        labels = [int(y) for _, targets in data_loader for y in targets]
        inner = getattr(data_loader.dataset, "dataset", None)
        runs.append({"labels": Counter(labels), "count": len(labels),
                     "indices": list(inner.indices) if isinstance(inner, torch.utils.data.Subset) else None})
        return original(model, criterion, data_loader, *args, **kwargs)

    monkeypatch.setattr(engine_finetune, "train_one_epoch", recording)
    return runs


def _fingerprint(text: str) -> str:
    found = re.findall(r"--label_fraction 0.25: training on 8 of 32 images, 4 per class of 2 \(seed \d+, subset "
                       r"fingerprint ([0-9a-f]{12})\)", text)
    assert len(found) == 1, text
    return found[0]


def test_scripts_train_on_the_subset_the_same_for_every_model(tiny_imagefolder, tmp_path, shallow_models,
                                                               trained_labels, capsys):
    expected = class_balanced_subset(build_dataset("imagefolder", str(tiny_imagefolder), "train", None), 0.25, seed=0)
    runs = {
        "probe tiny": (main_linprobe, ["--model", "vit_tiny_patch4"]),
        "probe small, cached": (main_linprobe, ["--model", "vit_small_patch4", "--cached_features", "true"]),
        "fine-tune tiny": (main_finetune, ["--model", "vit_tiny_patch4"]),
    }
    prints = {}
    for name, (module, flags) in runs.items():
        out = tmp_path / name.replace(" ", "_").replace(",", "")
        _run(module, tiny_imagefolder, out, *flags, "--label_fraction", "0.25", "--seed", "0")
        prints[name] = _fingerprint(capsys.readouterr().out)
        assert json.loads((out / "log.txt").read_text().splitlines()[-1])["train_images"] == 8
    assert len(set(prints.values())) == 1, prints
    # 8 of the 32 images, 4 per class (16 x 0.25), batch 4: two full steps over exactly the chosen images
    assert [r["labels"] for r in trained_labels] == [{0: 4, 1: 4}] * 3 and [r["count"] for r in trained_labels] == [8] * 3
    assert trained_labels[0]["indices"] == trained_labels[2]["indices"] == expected.indices
    _run(main_linprobe, tiny_imagefolder, tmp_path / "seed1", "--model", "vit_tiny_patch4", "--label_fraction", "0.25",
         "--seed", "1")
    assert _fingerprint(capsys.readouterr().out) != prints["probe tiny"]
    assert trained_labels[-1]["labels"] == {0: 4, 1: 4} and trained_labels[-1]["indices"] != expected.indices
    # without the flag: every image, as before
    _run(main_linprobe, tiny_imagefolder, tmp_path / "all", "--model", "vit_tiny_patch4")
    assert trained_labels[-1]["count"] == 32
    assert json.loads((tmp_path / "all" / "log.txt").read_text())["train_images"] == 32


@pytest.mark.parametrize("module", [main_linprobe, main_finetune])
def test_scripts_stop_before_training_when_a_class_gets_nothing(module, tiny_imagefolder, tmp_path, shallow_models,
                                                                  trained_labels):
    with pytest.raises(SystemExit) as exit_info:
        _run(module, tiny_imagefolder, tmp_path, "--model", "vit_tiny_patch4", "--label_fraction", "0.01")
    message = str(exit_info.value.code)
    assert "--label_fraction 0.01 keeps round(0.01 x 16) = 0 images of class 0 ('bright')" in message
    assert "--label_fraction >= 0.03125" in message
    assert not trained_labels and not (tmp_path / "log.txt").exists()
    # one image per class is fewer than a batch of 4: no step could run, said before training
    with pytest.raises(SystemExit, match="keeps 2 training images, fewer than one batch of --batch_size 4"):
        _run(module, tiny_imagefolder, tmp_path, "--model", "vit_tiny_patch4", "--label_fraction", "0.0625")
    assert not trained_labels


def test_tables_keep_label_fractions_apart():
    assert protocol_of({"layer_decay": 0.75, "label_fraction": 0.01}) == "fine-tune, label fraction 0.01"
    assert protocol_of({"cached_features": True, "label_fraction": 0.1}) == "linear probe, label fraction 0.1"
    assert protocol_of({"layer_decay": 0.75, "label_fraction": 1.0}) == protocol_of({"layer_decay": 0.75}) == "fine-tune"
