"""Flags, YAML config, checkpoints and the engine's bookkeeping."""
import errno
import os
import pickle
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import yaml

import main_finetune
import main_linprobe
import main_pretrain
from util.checkpoint import LAST, load_checkpoint, save_atomic, save_training_state
from util.config import parse_with_config, save_args
from util.metrics import NonFiniteLossError, RunningTerms


@pytest.mark.parametrize("module", [main_pretrain, main_finetune, main_linprobe])
def test_help_documents_every_flag(module, capsys):
    parser = module.get_args_parser()
    undocumented = [a.dest for a in parser._actions if a.dest != "help" and not a.help]
    assert not undocumented, f"flags without help text: {undocumented}"
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for action in parser._actions:
        for option in action.option_strings:
            assert option in text


def _fail(argv: list[str], capsys) -> str:
    parser = main_pretrain.get_args_parser()
    with pytest.raises(SystemExit) as exit_info:
        args = parse_with_config(parser, argv)
        main_pretrain.validate_args(args, parser)
    assert exit_info.value.code != 0
    return capsys.readouterr().err + str(exit_info.value.code)


@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.2"])
def test_bad_mask_ratio_is_named(ratio, tmp_path, capsys):
    assert "--mask_ratio" in _fail(["--mask_ratio", ratio, "--data_path", str(tmp_path)], capsys)


def test_unknown_model_and_missing_data_are_named(tmp_path, capsys):
    message = _fail(["--model", "mae_vit_nonexistent", "--data_path", str(tmp_path)], capsys)
    assert "--model" in message and "mae_vit_nonexistent" in message and "mae_vit_base_patch16" in message
    missing = tmp_path / "nowhere"
    message = _fail(["--data_path", str(missing)], capsys)
    assert "--data_path" in message and str(missing) in message


def test_yaml_sets_defaults_cli_overrides_and_unknown_keys_fail(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("batch_size: 7\nblr: 0.5\nnorm_pix_loss: true\n")
    parser = main_pretrain.get_args_parser()
    args = parse_with_config(parser, ["--config", str(config), "--blr", "0.25"])
    assert (args.batch_size, args.blr, args.norm_pix_loss) == (7, 0.25, True)
    save_args(args, str(tmp_path))
    saved = yaml.safe_load((tmp_path / "args.yaml").read_text())
    assert saved["batch_size"] == 7 and saved["blr"] == 0.25
    # the saved file is itself a valid config that reproduces the run's arguments
    again = parse_with_config(main_pretrain.get_args_parser(), ["--config", str(tmp_path / "args.yaml")])
    assert vars(again) == {**vars(args), "config": str(tmp_path / "args.yaml")}
    config.write_text("batch_sise: 7\n")
    with pytest.raises(SystemExit, match="unknown keys \\['batch_sise'\\]"):
        parse_with_config(main_pretrain.get_args_parser(), ["--config", str(config)])


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    state = {"model": {"w": torch.randn(3, 3)}, "epoch": 4, "args": {"model": "x", "lr": 0.1, "betas": [0.9, 0.95]}}
    path = tmp_path / "checkpoint-last.pth"
    save_atomic(state, path)
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["args"] == state["args"]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-last.pth"]  # no temp file left


def _save_epochs(folder: Path, epochs: range) -> None:
    args = Namespace(output_dir=str(folder), save_freq=2, epochs=4)
    for epoch in epochs:
        save_training_state(args, epoch, {"w": torch.full((2,), float(epoch))})


def _epoch_of(path: Path) -> int:
    state = load_checkpoint(path)
    assert torch.equal(state["w"], torch.full((2,), float(state["epoch"])))
    return state["epoch"]


def test_kept_epoch_links_last_to_the_kept_file_and_later_saves_leave_the_kept_file_intact(tmp_path):
    _save_epochs(tmp_path, range(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST] and (tmp_path / LAST).stat().st_nlink == 1
    _save_epochs(tmp_path, range(1, 2))  # epoch 1 is kept (--save_freq 2): one file under two names
    kept, last = tmp_path / "checkpoint-1.pth", tmp_path / LAST
    assert kept.samefile(last) and kept.stat().st_nlink == 2 and _epoch_of(last) == 1
    _save_epochs(tmp_path, range(2, 4))  # epoch 2 replaces last only; the final epoch 3 is kept and linked
    assert _epoch_of(kept) == 1 and kept.stat().st_nlink == 1
    assert _epoch_of(last) == 3 and last.samefile(tmp_path / "checkpoint-3.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1.pth", "checkpoint-3.pth", LAST]  # no temp file


def test_without_hard_links_last_is_written_as_a_copy(tmp_path, monkeypatch):
    def refuse(*_):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", refuse)
    _save_epochs(tmp_path, range(2))
    kept, last = tmp_path / "checkpoint-1.pth", tmp_path / LAST
    assert not kept.samefile(last) and _epoch_of(kept) == _epoch_of(last) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1.pth", LAST]


class _RunsCode:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/mim_test_pickle_ran"),))


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    marker = Path("/tmp/mim_test_pickle_ran")
    marker.unlink(missing_ok=True)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": _RunsCode()}, f)
    with pytest.raises(ValueError, match="refusing to load .*evil.pth"):
        load_checkpoint(path)
    assert not marker.exists()


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint-last.pth"
    save_atomic({"epoch": 1}, path)

    class Unsaveable:
        def __reduce__(self):
            raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        save_atomic({"epoch": 2, "bad": Unsaveable()}, path)
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-last.pth"]


def test_running_terms_means_and_non_finite_detection():
    running = RunningTerms(torch.device("cpu"))
    running.add({"loss": torch.tensor(1.0), "rec": torch.tensor(2.0)}, 0)
    running.add({"loss": torch.tensor(3.0), "rec": torch.tensor(4.0)}, 1)
    assert running.means() == {"loss": 2.0, "rec": 3.0}
    running.add({"loss": torch.tensor(1.0), "rec": torch.tensor(float("nan"))}, 2)
    running.add({"loss": torch.tensor(float("inf")), "rec": torch.tensor(1.0)}, 3)
    with pytest.raises(NonFiniteLossError, match=r"\['rec'\] at step 2"):
        running.means()
    assert running.means(raise_non_finite=False) == pytest.approx({"loss": 5 / 3, "rec": 7 / 3})  # the finite values


def test_running_terms_take_a_term_that_appears_on_some_steps_only():
    running = RunningTerms(torch.device("cpu"))
    running.add({"loss": torch.tensor(1.0)}, 0)
    running.add({"loss": torch.tensor(3.0), "extra": torch.tensor(10.0)}, 1)
    running.add({"extra": torch.tensor(20.0), "loss": torch.tensor(5.0)}, 2)  # another order
    running.add({"loss": torch.tensor(7.0)}, 3)
    assert running.means() == {"loss": 4.0, "extra": 15.0}  # each over the steps that have it
    running.add({"extra": torch.tensor(float("nan")), "loss": torch.tensor(1.0)}, 4)
    with pytest.raises(NonFiniteLossError, match=r"\['extra'\] at step 4"):
        running.means()


def test_base_chain_and_reference(tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text("batch_size: 7\nblr: 0.5\nreference: {source: paper, metric: top-1, value: 60.0}\n")
    child = tmp_path / "sub" / "child.yaml"
    child.write_text("_base_: ../base.yaml\nblr: 0.25\nreference: {source: paper, metric: top-1, value: 61.5}\n")
    args = parse_with_config(main_pretrain.get_args_parser(), ["--config", str(child), "--batch_size", "9"])
    assert (args.batch_size, args.blr, args.reference["value"]) == (9, 0.25, 61.5)  # CLI > child > base
    save_args(args, str(tmp_path))
    again = parse_with_config(main_pretrain.get_args_parser(), ["--config", str(tmp_path / "args.yaml")])
    assert again.reference == args.reference and again.blr == 0.25
    child.write_text("_base_: ../base.yaml\nreference: null\n")  # a row without a published number
    assert parse_with_config(main_pretrain.get_args_parser(), ["--config", str(child)]).reference is None
    (tmp_path / "base.yaml").write_text("_base_: sub/child.yaml\n")
    with pytest.raises(SystemExit, match="loops back"):
        parse_with_config(main_pretrain.get_args_parser(), ["--config", str(child)])
    child.write_text("reference: {value: high}\n")
    with pytest.raises(SystemExit, match="numeric `value`"):
        parse_with_config(main_pretrain.get_args_parser(), ["--config", str(child)])


@pytest.mark.parametrize("avx512_bf16,amx,expected", [(True, False, "bf16"), (False, True, "bf16"), (False, False, "none")])
def test_amp_auto_uses_bf16_only_where_the_cpu_computes_it(monkeypatch, avx512_bf16, amx, expected):
    """Emulated bf16 on a CPU without AVX-512 BF16 or AMX is many times slower than fp32, so auto means none there."""
    from util.precision import resolve_amp
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert resolve_amp("auto", torch.device("cpu")) == expected
    assert [resolve_amp(amp, torch.device("cpu")) for amp in ("bf16", "fp16", "none")] == ["bf16", "fp16", "none"]
    args = main_pretrain.get_args_parser().parse_args(["--data_path", "x"])
    assert args.amp == "auto"
