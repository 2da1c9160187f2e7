"""Every value is checked the same way, from the command line, a YAML preset (its `_base_` chain included) or a
saved args.yaml: the error names the source, the value and what is allowed, before any data or model is built."""
import argparse

import pytest

import main_pretrain
from util.config import parse_with_config
from util.registry import method_for
from util.spec import Interval, Knob, check_values, with_defaults


def parse(argv):
    return parse_with_config(main_pretrain.get_args_parser(), argv)


def yaml_error(tmp_path, text: str) -> str:
    preset = tmp_path / "preset.yaml"
    preset.write_text(text)
    with pytest.raises(SystemExit) as caught:
        parse(["--config", str(preset)])
    message = str(caught.value)
    assert str(preset) in message  # the source: the file ...
    return message


@pytest.mark.parametrize("line, key, allowed", [
    ("nan_policy: skipp", "nan_policy", "'stop', 'skip'"),
    ("mi_feat: clss", "mi_feat", "mean, cls"),
    ("amp: bf61", "amp", "'bf16'"),
    ("mask_ratio: 1.5", "mask_ratio", "between 0 and 1"),
    ("epochs: ten", "epochs", "int"),
    ("epochs: 10.5", "epochs", "int"),  # not silently truncated to 10
    ("w_min: -1", "w_min", "[0, inf)"),
    ("v_steps: 2.5", "v_steps", "int"),
    ("club_standardize: maybe", "club_standardize", "bool"),
    ("norm_pix_loss: 1", "norm_pix_loss", "true or false"),
    ("rec_views: 3", "rec_views", "1, 2"),
    ("reg: spectrall", "reg", "spectral"),
])
def test_a_bad_yaml_value_is_refused_naming_file_key_value_and_what_is_allowed(tmp_path, line, key, allowed):
    message = yaml_error(tmp_path, line + "\n")
    value = line.split(": ")[1]
    assert f": {key}:" in message and value in message and allowed in message, message


def test_the_error_names_the_base_file_that_holds_the_bad_value(tmp_path):
    (tmp_path / "base.yaml").write_text("mi_feat: clss\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\nepochs: 3\n")
    with pytest.raises(SystemExit) as caught:
        parse(["--config", str(tmp_path / "child.yaml")])
    assert str(tmp_path / "base.yaml") in str(caught.value) and "clss" in str(caught.value)


@pytest.mark.parametrize("flag, value, allowed", [("--w_min", "-1", "[0, inf)"), ("--mask_ratio", "1.5", "between 0 and 1"),
                                                  ("--mi_feat", "clss", "mean, cls"), ("--num_masks", "0", "[1, inf)"),
                                                  ("--pos_ratio", "0", "(0, 1]"), ("--tcr_mu", "0", "(0, inf)")])
def test_a_bad_command_line_value_is_refused_naming_flag_value_and_what_is_allowed(capsys, flag, value, allowed):
    with pytest.raises(SystemExit):
        parse(["--data_path", ".", flag, value])
    err = capsys.readouterr().err
    assert flag in err and value in err and allowed in err, err


def test_good_yaml_values_arrive_with_their_types(tmp_path):
    preset = tmp_path / "good.yaml"
    preset.write_text("blr: 1.5e-4\nepochs: 10\nw_min: 0\nclub_standardize: false\nreg: Spectral\nlr: null\nmask_ratio: 0.6\n")
    args = parse(["--config", str(preset)])
    assert (args.blr, args.epochs, args.w_min, args.club_standardize) == (1.5e-4, 10, 0.0, False)
    assert isinstance(args.w_min, float) and args.reg == "uniformity" and args.lr is None and args.mask_ratio == 0.6
    assert parse(["--config", str(preset), "--w_min", "2"]).w_min == 2.0  # the command line still wins


def test_interval_parsing_and_membership():
    closed_open = Interval.parse("[0, inf)")
    assert closed_open.contains(0.0) and closed_open.contains(1e9) and not closed_open.contains(-1e-9)
    assert not closed_open.contains(float("nan"))
    open_closed = Interval.parse("(0, 1]")
    assert not open_closed.contains(0.0) and open_closed.contains(1.0) and not open_closed.contains(1.0001)
    with pytest.raises(ValueError, match="interval"):
        Interval.parse("0..1")


def test_a_knob_converts_each_source_type_strictly():
    count = Knob("steps", 4, "extra steps", interval="[0, inf)")
    assert count.convert("7") == 7 and count.convert(7) == 7 and count.convert(7.0) == 7
    for bad in ("7.5", 7.5, True, "-1", "seven"):
        with pytest.raises(argparse.ArgumentTypeError):
            count.convert(bad)
    flag = Knob("on", True, "a switch")
    assert flag.convert("false") is False and flag.convert(True) is True and flag.convert(0) is False  # as "--on 0"
    for bad in ("maybe", 2):
        with pytest.raises(argparse.ArgumentTypeError):
            flag.convert(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="one of a, b"):
        Knob("mode", "a", "a mode", choices=("a", "b")).convert("c")


def test_a_declaration_that_violates_itself_fails_at_import():
    with pytest.raises(argparse.ArgumentTypeError):
        Knob("weight", -1.0, "a weight", interval="[0, inf)")
    with pytest.raises(ValueError, match="explicit type"):
        Knob("depth", None, "a depth")


def test_model_arguments_are_checked_like_flags():
    knobs = method_for("mi_mae_vit_tiny_patch4").knobs
    with pytest.raises(ValueError, match="--w_min"):
        check_values(knobs, {"w_min": -1.0})
    filled = with_defaults(knobs, {"w_min": 0})
    assert filled["w_min"] == 0.0 and filled["num_masks"] == 4  # the declaration's default fills in
    from util.registry import create_model
    with pytest.raises(ValueError, match="--mi_feat"):
        create_model("mi_mae_vit_tiny_patch4", img_size=32, mi_feat="clss")


def test_each_methods_knobs_are_declared_once_and_become_flags_and_model_arguments():
    parser = main_pretrain.get_args_parser()
    flags = {option for action in parser._actions for option in action.option_strings}
    for model in ("mi_mae_vit_tiny_patch4", "cmae_vit_tiny_patch4", "u_mae_vit_tiny_patch4", "m_mae_vit_tiny_patch4"):
        method = method_for(model)
        names = [knob.name for knob in method.knobs]
        assert len(names) == len(set(names)) and {f"--{name}" for name in names} <= flags
        args = parse(["--model", model, "--data_path", "."])
        kwargs = method.model_kwargs(args)
        assert {k.name for k in method.knobs if k.model_arg and getattr(args, k.name) is not None} <= set(kwargs)
        assert not {k.name for k in method.knobs if not k.model_arg} & set(kwargs)  # data-pipeline knobs stay out
