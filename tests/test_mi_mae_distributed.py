"""MI-MAE under torchrun (gloo): at its defaults (gathered InfoNCE negatives, the projector's global BatchNorm,
CLUB's global moments) 2 ranks get the single-process gradient; full runs train."""
import json

import pytest
import torch
from conftest import run_script
from mi_grad_worker import fixed_batch, model_gradients


def test_two_rank_gradient_equals_single_process(tmp_path):
    run_script(["tests/mi_grad_worker.py", str(tmp_path / "grads.pt")], torchrun=2)
    distributed = torch.load(tmp_path / "grads.pt", weights_only=True)
    single = model_gradients(*fixed_batch())
    assert distributed.keys() == single.keys()
    for name, grad in single.items():
        torch.testing.assert_close(distributed[name], grad, rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")


@pytest.mark.slow
@pytest.mark.parametrize("nce_gather", ["false", "true"])
def test_two_rank_mi_mae_pretraining(nce_gather, tiny_imagefolder, tmp_path):
    flags = ["--model", "mi_mae_vit_tiny_patch4", "--data_path", str(tiny_imagefolder), "--output_dir", str(tmp_path),
             "--input_size", "32", "--batch_size", "4", "--epochs", "2", "--warmup_epochs", "1", "--num_workers", "0",
             "--amp", "none", "--vis_freq", "1", "--print_freq", "2", "--norm_pix_loss", "--nce_gather", nce_gather]
    run_script(["tests/pretrain_worker.py", *flags], torchrun=2)
    log = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1]
    assert {"train_rec", "train_max_mi", "train_min_mi", "train_v_nll", "train_nce_acc"} <= set(log[-1])
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    # weights and BatchNorm statistics alike: the global BatchNorm moves them identically on every rank
    assert [k for k in rank0 if not torch.equal(rank0[k], rank1[k])] == []
    checkpoint = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert any(k.startswith("variational.") for k in checkpoint["model"])
