"""tools/benchmark.py (FLOP count, JSON output, data mode), tools/compare_official.py's import shims, and the
throughput levers of training: gradient checkpointing (same gradients), unfused attention (same weights up to
rounding) and --compile's fallback."""
import json
import sys
import warnings

import numpy as np
import pytest
import timm.models.vision_transformer as timm_vit
import torch
from torch.utils.flop_counter import FlopCounterMode

import engine_pretrain
import main_pretrain
from tools import benchmark, compare_official
from util.config import parse_with_config
from util.registry import create_model

TINY = dict(depth=2, decoder_depth=1, norm_pix_loss=True)


def tiny_model(name: str = "mae_vit_tiny_patch4", **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(name, **{**TINY, **kwargs})
    benchmark.set_fused_attn(model, False)  # attention as explicit matmuls, which the FLOP counter sees
    return model


def test_forward_flops_equal_torch_flop_counter():
    model, images = tiny_model(), torch.randn(3, 3, 32, 32)
    with FlopCounterMode(display=False) as counter:
        model(images)
    assert counter.get_total_flops() == 3 * benchmark.forward_flops_per_image(model)


def test_train_flops_are_three_forwards_but_for_the_patch_embedding_input_gradient():
    model, images = tiny_model(), torch.randn(2, 3, 32, 32)
    with FlopCounterMode(display=False) as counter:
        model(images).loss.backward()
    patch_embed = 2 * model.num_patches * model.patch_embed.proj.weight.numel()
    # the convention counts the image's gradient, which autograd never computes
    assert counter.get_total_flops() == 2 * (benchmark.train_flops_per_image(model) - patch_embed)


def test_mae_vit_base_flops_closed_form_and_published():
    with torch.device("meta"):  # shapes only: no memory, no time
        model = create_model("mae_vit_base_patch16")
    forward = benchmark.forward_flops_per_image(model)

    def blocks(depth, tokens, dim):  # qkv, proj, fc1, fc2 (mlp 4x) + QK^T and AV
        return depth * (2 * tokens * dim * dim * (3 + 1 + 4 + 4) + 4 * tokens**2 * dim)

    closed = (2 * 196 * 768 * 768 + blocks(12, 1 + 49, 768) + 2 * 50 * 768 * 512 + blocks(8, 197, 512)
              + 2 * 197 * 512 * 768)
    assert forward == closed
    assert forward / 1e9 == pytest.approx(19.6, abs=0.05)
    assert benchmark.train_flops_per_image(model) / 1e9 == pytest.approx(58.7, abs=0.05)


def test_mi_mae_shares_one_patch_embedding_per_image():
    mae, mi_mae = tiny_model(), tiny_model("mi_mae_vit_tiny_patch4", num_masks=4)
    patch_embed = 2 * mae.num_patches * mae.patch_embed.proj.weight.numel()
    assert benchmark.forward_flops_per_image(mi_mae) == 4 * benchmark.forward_flops_per_image(mae) - 3 * patch_embed


def test_benchmark_step_emits_a_table_and_json_lines(capsys):
    results = benchmark.main(["--model", "mae_vit_tiny_patch4", "--batch_size", "2", "--precision", "fp32",
                              "--steps", "2", "--warmup", "1", "--peak_tflops", "1", "--vs", "adamw=foreach"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert lines == results and [r["adamw"] for r in results] == ["fused", "foreach"]
    for result in results:
        assert {"model", "batch_size", "precision", "device", "img_per_s", "peak_mem_mb", "mfu"} <= set(result)
        assert result["img_per_s"] > 0 and result["peak_mem_mb"] > 0
        # mfu is rounded to 4 decimals: on a loaded machine it is ~0.002 here, so the rounding needs an absolute margin
        assert result["mfu"] == pytest.approx(result["img_per_s"] * result["train_gflops_per_image"] / 1000, rel=1e-2, abs=6e-5)


@pytest.mark.parametrize("item", ["no_such_flag=1", "fused_attn", "threads=1"])
def test_vs_names_a_flag_of_one_configuration(item):
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        benchmark.main(["--vs", item])


def test_data_mode_times_ours_and_the_official_pipeline(tiny_imagefolder):
    ours, official = benchmark.main(["--mode", "data", "--data_path", str(tiny_imagefolder), "--model", "mae_vit_tiny_patch4",
                                     "--batch_size", "4", "--num_workers", "0", "--batches", "2", "--rounds", "2"])
    assert (ours["pipeline"], official["pipeline"]) == ("ours (fast)", "official")
    for result in (ours, official):
        assert result["img_per_s"] > 0 and result["epoch_startup_s"] > 0 and result["input_size"] == 32
    assert ours["vs_official"] == pytest.approx(ours["img_per_s"] / official["img_per_s"], rel=0.01)
    assert official["vs_official"] == 1.0
    loaders, _ = benchmark.data_loaders(benchmark.get_args_parser().parse_args(
        ["--data_path", str(tiny_imagefolder), "--model", "mae_vit_tiny_patch4", "--batch_size", "4", "--batches", "1"]))
    images, labels, noise = next(iter(loaders["ours"]))  # uint8, normalised on the device by the engine
    reference, _ = next(iter(loaders["official"]))
    assert images.dtype == torch.uint8 and images.shape == reference.shape == (4, 3, 32, 32) and noise.shape == (4, 64)


FAKE_MODELS = """
import torch.nn as nn
from timm.models.vision_transformer import Block
from util.pos_embed import table

class MaskedAutoencoderViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block(8, 2, qk_scale=None)
        self.table = table(4)
"""
FAKE_POS_EMBED = """
import numpy as np

def table(n):
    return np.arange(n, dtype=np.float)
"""


def test_official_import_shims_stay_inside_the_official_code(tmp_path):
    (tmp_path / "util").mkdir()
    (tmp_path / "models_mae.py").write_text(FAKE_MODELS)
    (tmp_path / "util" / "pos_embed.py").write_text(FAKE_POS_EMBED)
    ours_util, ours_block = sys.modules["util"], timm_vit.Block

    official = compare_official.load_official_mae(str(tmp_path))
    model = official.MaskedAutoencoderViT()
    assert isinstance(model.block, ours_block) and model.table.dtype == np.float64
    # afterwards: our util package, timm's own Block, numpy without np.float
    assert sys.modules["util"] is ours_util and timm_vit.Block is ours_block and not hasattr(np, "float")
    with pytest.raises(TypeError):
        timm_vit.Block(8, 2, qk_scale=None)
    with pytest.raises(ValueError, match="qk_scale"):
        compare_official.BlockIgnoringQkScale(8, 2, qk_scale=0.5)


def test_official_path_without_the_code_is_an_error_naming_the_flag(tmp_path):
    with pytest.raises(SystemExit, match="--official_path"):
        compare_official.load_official_mae(str(tmp_path))


def test_grad_checkpointing_gives_identical_gradients():
    images, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model()
        model.set_grad_checkpointing(checkpointing)
        model(images, noise).loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_compile_falls_back_to_eager_with_a_warning(monkeypatch):
    def unsupported(*args, **kwargs):
        raise RuntimeError("Dynamo is not supported on this Python")

    monkeypatch.setattr(torch, "compile", unsupported)
    model = tiny_model()
    with pytest.warns(UserWarning, match="--compile"):
        assert not engine_pretrain.compile_model(model)
    assert torch.isfinite(model(torch.randn(2, 3, 32, 32)).loss)


def pretrain_one_epoch(data_path, output_dir, *flags: str) -> torch.nn.Module:
    """main_pretrain.py's model after one epoch of the tiny model on `data_path`, with `flags` added."""
    args = parse_with_config(main_pretrain.get_args_parser(), [
        "--model", "mae_vit_tiny_patch4", "--data_path", str(data_path), "--input_size", "32",
        "--batch_size", "8", "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "0", "--amp", "none",
        "--vis_freq", "0", "--output_dir", str(output_dir), "--device", "cpu", *flags])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return main_pretrain.main(args)


def test_pretraining_with_grad_checkpointing_trains_the_same_weights(tiny_imagefolder, tmp_path, shallow_models):
    trained = [pretrain_one_epoch(tiny_imagefolder, tmp_path / checkpointing, "--grad_checkpointing", checkpointing).state_dict()
               for checkpointing in ("false", "true")]
    for key in trained[0]:
        assert torch.equal(trained[0][key], trained[1][key]), key


def test_pretraining_with_unfused_attention_trains_the_same_weights_up_to_rounding(tiny_imagefolder, tmp_path, shallow_models):
    trained = {fused: pretrain_one_epoch(tiny_imagefolder, tmp_path / fused, "--fused_attn", fused) for fused in ("true", "false")}
    attention = [m for m in trained["false"].modules() if hasattr(m, "fused_attn")]
    assert attention and not any(m.fused_attn for m in attention)
    assert all(m.fused_attn for m in trained["true"].modules() if hasattr(m, "fused_attn"))
    fused_weights, unfused_weights = trained["true"].state_dict(), trained["false"].state_dict()
    for key in fused_weights:
        torch.testing.assert_close(unfused_weights[key], fused_weights[key], rtol=1e-4, atol=1e-5, msg=key)


def test_stage_times_cover_both_ways_of_each_stage(tmp_path):
    from tools.make_benchmark_jpegs import make_set

    folder = make_set(tmp_path / "jpegs", count=3)
    *_, stages = benchmark.main(["--mode", "data", "--data_path", str(folder), "--model", "mae_vit_tiny_patch4",
                                 "--batch_size", "1", "--num_workers", "0", "--batches", "1", "--rounds", "1", "--stages", "3"])
    assert stages["pipeline"].startswith("stages") and all(stages[k] > 0 for k in (
        "decode_pil", "decode_torchvision", "resize_pil_bicubic", "resize_torch_uint8_bicubic", "to_tensor_normalize"))
