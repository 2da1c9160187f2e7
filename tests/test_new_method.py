"""A method added in one file (tests/toy_method.py) gets flags, presets, checks, per-term logs, k-NN and resume."""
import json
import sys
from pathlib import Path

import pytest
from conftest import run_script

import main_pretrain
from util import registry
from util.config import parse_with_config
from util.registry import method_for, register_module


@pytest.fixture(autouse=True, scope="module")
def toy_registered():
    """Register the toy method for this file's tests only: the other tests see the registry as shipped."""
    state = (registry._MODELS, registry._METHODS, registry._REGISTERED, registry.MODEL_MODULES)
    saved = [container.copy() for container in state]
    sys.path.insert(0, str(Path(__file__).parent))
    register_module("toy_method")
    yield
    sys.path.remove(str(Path(__file__).parent))
    for container, before in zip(state, saved):
        container.clear()
        container.update(before) if isinstance(container, (dict, set)) else container.extend(before)


def test_its_knob_is_a_flag_a_preset_key_and_a_model_argument(tmp_path, capsys):
    parser = main_pretrain.get_args_parser()
    assert "--toy_lambda" in parser.format_help()
    preset = tmp_path / "toy.yaml"
    preset.write_text("model: toy_mae_vit_tiny_patch4\ntoy_lambda: 0.5\n")
    args = parse_with_config(parser, ["--config", str(preset)])
    assert method_for(args.model).model_kwargs(args)["toy_lambda"] == 0.5
    preset.write_text("toy_lambda: -0.5\n")
    with pytest.raises(SystemExit, match=r"toy\.yaml: toy_lambda: -0\.5 .*\[0, inf\)"):
        parse_with_config(main_pretrain.get_args_parser(), ["--config", str(preset)])
    with pytest.raises(SystemExit):
        parse_with_config(main_pretrain.get_args_parser(), ["--toy_lambda", "x"])
    assert "--toy_lambda" in capsys.readouterr().err


def test_it_trains_logs_its_term_runs_knn_and_resumes(tiny_imagefolder, tmp_path):
    out = tmp_path / "toy"
    flags = ["tests/toy_method.py", "--model", "toy_mae_vit_tiny_patch4", "--data_path", str(tiny_imagefolder),
             "--output_dir", str(out), "--input_size", "32", "--batch_size", "8", "--warmup_epochs", "1", "--blr", "1e-3",
             "--num_workers", "0", "--amp", "none", "--vis_freq", "0", "--print_freq", "2", "--knn_freq", "1",
             "--toy_lambda", "0.5"]
    run_script([*flags, "--epochs", "1"])
    resumed = run_script([*flags, "--epochs", "2"])
    assert "resumed from" in resumed.stdout
    assert "--epochs 2 (checkpoint: 1)" in resumed.stdout  # a result-changing flag that differs is listed
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1]
    for record in log:
        assert record["train_loss"] == pytest.approx(record["train_rec"] + 0.5 * record["train_cls_square"], rel=1e-4)
        assert 0 <= record["test_knn_acc1"] <= 100
