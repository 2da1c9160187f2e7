"""Every loss-weight pattern the presets use trains under torchrun with 2 gloo ranks: a head whose term has weight 0
must stay out of the graph that DDP reduces (else "Expected to have finished reduction" at the second step), and
the ranks must end with the same weights (MI-MAE's extra V steps average their gradients over ranks too)."""
import pytest
import torch
from conftest import run_script

PATTERNS = {
    "mi_mae_all_terms": ["--model", "mi_mae_vit_tiny_patch4", "--v_steps", "2"],
    "mi_mae_control": ["--model", "mi_mae_vit_tiny_patch4", "--w_max", "0", "--w_min", "0", "--w_v", "0"],
    "mi_mae_max_only": ["--model", "mi_mae_vit_tiny_patch4", "--w_min", "0", "--w_v", "0"],
    "mi_mae_min_only": ["--model", "mi_mae_vit_tiny_patch4", "--w_max", "0"],
    "mi_mae_mask_level": ["--model", "mi_mae_vit_tiny_patch4", "--club_level", "mask"],
    "cmae_no_contrast": ["--model", "cmae_vit_tiny_patch4", "--con_weight", "0"],
    "cmae_no_position": ["--model", "cmae_vit_tiny_patch4", "--pos_weight", "0"],
    "cmae_decoder_only": ["--model", "cmae_vit_tiny_patch4", "--con_weight", "0", "--pos_weight", "0"],
    "u_mae_no_reg": ["--model", "u_mae_vit_tiny_patch4", "--reg_lambda", "0"],
    "m_mae_no_reg": ["--model", "m_mae_vit_tiny_patch4", "--reg_lambda", "0"],
}


@pytest.mark.slow
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_two_gloo_ranks_train_each_loss_pattern(pattern, tiny_imagefolder, tmp_path):
    run_script(["tests/pretrain_worker.py", *PATTERNS[pattern], "--data_path", str(tiny_imagefolder), "--input_size", "32",
                "--batch_size", "4", "--epochs", "1", "--warmup_epochs", "0", "--blr", "1e-3", "--subset_size", "16",
                "--num_workers", "0", "--amp", "none", "--vis_freq", "0", "--print_freq", "1", "--norm_pix_loss",
                "--output_dir", str(tmp_path)], torchrun=2)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    # weights and BatchNorm statistics alike (the global BatchNorm moves them identically on every rank)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between the ranks"
