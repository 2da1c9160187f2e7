"""U-MAE and M-MAE models: the loss against the pure functions, the official flags, end-to-end runs."""
import json
import math

import pytest
import torch
from conftest import run_script

import main_pretrain
from models_mae import MaskedAutoencoderViT
from util.config import parse_with_config
from util.mim import random_masking
from util.registry import create_model, method_for
from util.regularizers import tcr_loss, uniformity_loss

REG_OF = {"u_mae_vit_tiny_patch4": "uniformity", "m_mae_vit_tiny_patch4": "tcr"}
SHALLOW = {"img_size": 8, "depth": 2, "decoder_depth": 1}  # tiny widths, 2x2 patches, few blocks: fast on the CPU


@pytest.mark.parametrize("name", sorted(REG_OF))
@pytest.mark.parametrize("double_norm", [True, False])
def test_loss_is_reconstruction_plus_lambda_times_the_pure_term(name, double_norm):
    torch.manual_seed(0)
    reg_lambda, mu = 0.3, 2.0
    model = create_model(name, **SHALLOW, norm_pix_loss=True, mask_ratio=0.5, reg_lambda=reg_lambda, tcr_mu=mu,
                         reg_double_norm=double_norm)
    images, noise = torch.randn(4, 3, 8, 8), torch.rand(4, 4)
    loss, terms, features = model(images, noise)
    assert model.reg == REG_OF[name]
    assert set(terms) == {"rec", "reg", "uniformity", "tcr"}
    assert all(v.ndim == 0 and not v.requires_grad for v in terms.values())

    # independently: MAE's loss on the same mask, and the cls token normed once more (the official models' feature)
    rec = MaskedAutoencoderViT.forward(model, images, noise).loss
    cls = model.encode(model.embed_patches(images), random_masking(noise, 0.5).ids_keep)[:, 0]
    expected_features = model.norm(cls) if double_norm else cls
    torch.testing.assert_close(features, expected_features)
    values = {"uniformity": uniformity_loss(expected_features), "tcr": tcr_loss(expected_features, mu)}
    reg = values[REG_OF[name]]
    assert terms["rec"].item() == pytest.approx(rec.item(), rel=1e-6)
    assert terms["reg"].item() == pytest.approx(reg.item(), rel=1e-6)
    assert terms["uniformity"].item() == pytest.approx(values["uniformity"].item(), rel=1e-6)
    assert terms["tcr"].item() == pytest.approx(values["tcr"].item(), rel=1e-6)
    assert loss.item() == pytest.approx(rec.item() + reg_lambda * reg.item(), rel=1e-6)

    # the regulariser's gradient reaches the encoder: the same weights with lambda = 0 get another gradient
    loss.backward()
    with_reg = model.cls_token.grad.clone()
    model.zero_grad()
    model.reg_lambda = 0.0
    model(images, noise).loss.backward()
    assert not torch.allclose(model.cls_token.grad, with_reg)


def test_reg_none_is_mae_and_still_logs_both_terms():
    torch.manual_seed(0)
    model = create_model("m_mae_vit_tiny_patch4", **SHALLOW, mask_ratio=0.5, reg="none")
    images, noise = torch.randn(3, 3, 8, 8), torch.rand(3, 4)
    loss, terms, _ = model(images, noise)
    assert loss.item() == MaskedAutoencoderViT.forward(model, images, noise).loss.item()
    assert terms["reg"].item() == 0.0 and 0 < terms["uniformity"].item() <= 1 and terms["tcr"].item() < 0


def parse(argv: list[str]):
    parser = main_pretrain.get_args_parser()
    args = parse_with_config(parser, ["--data_path", ".", *argv])
    main_pretrain.validate_args(args, parser)
    return args


def test_official_flag_names_parse_to_the_same_values():
    assert parse(["--lamb", "0.02"]).reg_lambda == parse(["--reg_lambda", "0.02"]).reg_lambda == 0.02
    assert parse(["--uniformity_mu", "3"]).tcr_mu == parse(["--uniformity_lamda", "3"]).tcr_mu == 3.0
    assert parse([]).tcr_center is False and parse(["--centering"]).tcr_center is True
    assert parse(["--centering", "False"]).tcr_center is False and parse(["--centering", "True"]).tcr_center is True
    assert parse(["--tcr_center", "false"]).tcr_center is False
    official_values = {"TCR": "tcr", "tcr": "tcr", "square": "uniformity", "spectral": "uniformity",
                       "entropy": "uniformity", "none": "none"}
    for value, reg in official_values.items():
        assert parse(["--model", "m_mae_vit_base_patch16", "--reg", value]).reg == reg
    # M-MAE's pretrain.sh, with lambda converted: the model gets what the official run computes
    args = parse(["--model", "m_mae_vit_large_patch16", "--norm_pix_loss", "--lamb", "1.25e-3", "--uniformity_lamda", "3",
                  "--reg", "TCR", "--centering", "False"])
    kwargs = method_for(args.model).model_kwargs(args)
    assert {k: kwargs[k] for k in ("reg", "reg_lambda", "tcr_mu", "tcr_center", "reg_double_norm")} == \
        {"reg": "tcr", "reg_lambda": 1.25e-3, "tcr_mu": 3.0, "tcr_center": False, "reg_double_norm": True}
    # without --reg each factory keeps its own term; --reg square turns M-MAE into U-MAE's loss
    for name, reg in REG_OF.items():
        assert create_model(name, **method_for(name).model_kwargs(parse(["--model", name, "--input_size", "8"]))).reg == reg
    square = parse(["--model", "m_mae_vit_tiny_patch4", "--input_size", "8", "--reg", "square"])
    assert create_model(square.model, **method_for(square.model).model_kwargs(square)).reg == "uniformity"


@pytest.mark.parametrize("argv,flag", [(["--reg", "bogus"], "--reg"), (["--model", "u_mae_vit_tiny_patch4", "--reg", "tcr"], "--reg"),
                                       (["--model", "m_mae_vit_tiny_patch4", "--lamb", "-1"], "--reg_lambda"),
                                       (["--model", "m_mae_vit_tiny_patch4", "--tcr_mu", "0"], "--tcr_mu"),
                                       (["--centering", "maybe"], "--centering")])
def test_bad_regularizer_flags_are_named(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code != 0 and flag in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("name,flags", [("u_mae_vit_tiny_patch4", ["--reg", "spectral", "--lamb", "0.5"]),
                                        ("m_mae_vit_tiny_patch4", ["--reg", "TCR", "--lamb", "0.5", "--uniformity_mu", "3", "--centering", "False"])])
def test_pretraining_logs_rec_reg_and_online_probe(name, flags, tiny_imagefolder, tmp_path):
    run_script(["main_pretrain.py", "--model", name, "--data_path", str(tiny_imagefolder), "--output_dir", str(tmp_path),
                "--input_size", "32", "--batch_size", "8", "--epochs", "1", "--warmup_epochs", "1", "--num_workers", "0",
                "--amp", "none", "--vis_freq", "0", "--print_freq", "2", "--online_probe", "true", "--norm_pix_loss", *flags])
    (record,) = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert {"train_rec", "train_reg", "train_uniformity", "train_tcr", "train_probe_ce", "train_probe_acc"} <= set(record)
    assert record["train_loss"] == pytest.approx(record["train_rec"] + 0.5 * record["train_reg"] + record["train_probe_ce"], rel=1e-5)
    assert 0.0 <= record["train_probe_acc"] <= 100.0
    # the spec's ranges for unit rows, here m = 8 < d = 192: R_U in [1/m, 1], -R_TCR in [log(1 + mu m/d), m log(1 + mu/d)]
    m, d, mu = 8, 192, 1.0 if name.startswith("u_") else 3.0
    assert 1 / m <= record["train_uniformity"] <= 1
    assert math.log(1 + mu * m / d) - 1e-6 <= -record["train_tcr"] <= m * math.log(1 + mu / d) + 1e-6
    assert record["train_reg"] == record["train_uniformity" if name.startswith("u_") else "train_tcr"]
