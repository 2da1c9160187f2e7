"""A method added in one file (examples/toy_method.py) gets flags, presets, checks, per-term logs, k-NN and resume,
runs as documented on a fresh clone, and runs from outside the repository through $MIM_METHODS."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_script

import main_pretrain
from util import registry
from util.config import parse_with_config
from util.registry import method_for, register_module

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(autouse=True, scope="module")
def toy_registered():
    """Register the toy method for this file's tests only: the other tests see the registry as shipped."""
    state = (registry._MODELS, registry._METHODS, registry._REGISTERED, registry.MODEL_MODULES)
    saved = [container.copy() for container in state]
    sys.path.insert(0, str(EXAMPLES))
    register_module("toy_method")
    yield
    sys.path.remove(str(EXAMPLES))
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
    flags = ["examples/toy_method.py", "--model", "toy_mae_vit_tiny_patch4", "--data_path", str(tiny_imagefolder),
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


def test_the_example_runs_without_pythonpath_and_an_outside_method_through_every_script(tmp_path):
    """`python examples/toy_method.py --help` on a fresh clone (no PYTHONPATH); a module outside the repository,
    named in $MIM_METHODS, adds its flags to main_pretrain.py and to submitit_pretrain.py."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    root = EXAMPLES.parent
    example = subprocess.run([sys.executable, "examples/toy_method.py", "--help"], cwd=root, env=env,
                             capture_output=True, text=True, timeout=120)
    assert example.returncode == 0 and "--toy_lambda" in example.stdout, example.stderr[-2000:]
    outside = tmp_path / "my_methods"
    outside.mkdir()
    (outside / "my_method.py").write_text((EXAMPLES / "toy_method.py").read_text())
    env = {**env, "MIM_METHODS": "my_method", "PYTHONPATH": str(outside)}
    for script in ("main_pretrain.py", "submitit_pretrain.py"):
        result = subprocess.run([sys.executable, script, "--help"], cwd=root, env=env, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0 and "--toy_lambda" in result.stdout and "toy_mae_vit_tiny_patch4" in result.stdout, \
            f"{script}: {result.stderr[-2000:]}"
