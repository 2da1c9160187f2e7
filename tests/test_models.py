"""Every registered model runs forward/backward; official MAE key names and shapes load strictly."""
import pytest
import torch

from models_vit import batchnorm_head, load_pretrained_encoder
from util.registry import create_model, list_models, pretrain_models


def _patch(name: str) -> int:
    return 14 if "patch14" in name else 16 if "patch16" in name else 4


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_every_model(name):
    torch.manual_seed(0)
    size = 2 * _patch(name)  # a 2x2 patch grid and 2 blocks keep even ViT-H cheap on the CPU, at its real width
    images = torch.randn(2, 3, size, size)
    if name in pretrain_models():
        extra = {"num_masks": 2} if name.startswith("mi_mae_") else {}  # 2 disjoint masks fit 4 patches at ratio 0.5
        model = create_model(name, img_size=size, depth=2, decoder_depth=1, norm_pix_loss=True, mask_ratio=0.5, **extra)
        views = getattr(model, "views_per_image", 1)  # CMAE takes (B, views, C, H, W)
        loss, terms, features = model(torch.stack([images] * views, dim=1) if views > 1 else images)
        assert "rec" in terms and all(v.ndim == 0 and not v.requires_grad for v in terms.values())
        assert features.shape == (2, model.cls_token.shape[-1])
    else:
        model = create_model(name, img_size=size, depth=2, num_classes=5)
        logits = model(images)
        assert logits.shape == (2, 5)
        loss = logits.square().mean()
    assert torch.isfinite(loss)
    loss.backward()
    for param_name, param in model.named_parameters():
        if param.requires_grad and param_name.startswith(("patch_embed", "blocks", "cls_token")):
            assert param.grad is not None, f"{name}: no gradient for {param_name}"


def _block_keys(prefix: str, dim: int) -> dict[str, tuple]:
    return {
        f"{prefix}.norm1.weight": (dim,), f"{prefix}.norm1.bias": (dim,),
        f"{prefix}.attn.qkv.weight": (3 * dim, dim), f"{prefix}.attn.qkv.bias": (3 * dim,),
        f"{prefix}.attn.proj.weight": (dim, dim), f"{prefix}.attn.proj.bias": (dim,),
        f"{prefix}.norm2.weight": (dim,), f"{prefix}.norm2.bias": (dim,),
        f"{prefix}.mlp.fc1.weight": (4 * dim, dim), f"{prefix}.mlp.fc1.bias": (4 * dim,),
        f"{prefix}.mlp.fc2.weight": (dim, 4 * dim), f"{prefix}.mlp.fc2.bias": (dim,),
    }


def official_mae_vit_base_shapes() -> dict[str, tuple]:
    """Key names and shapes of facebookresearch/mae's mae_vit_base_patch16 (written out from its model file)."""
    shapes = {"cls_token": (1, 1, 768), "pos_embed": (1, 197, 768),
              "patch_embed.proj.weight": (768, 3, 16, 16), "patch_embed.proj.bias": (768,),
              "norm.weight": (768,), "norm.bias": (768,),
              "decoder_embed.weight": (512, 768), "decoder_embed.bias": (512,), "mask_token": (1, 1, 512),
              "decoder_pos_embed": (1, 197, 512), "decoder_norm.weight": (512,), "decoder_norm.bias": (512,),
              "decoder_pred.weight": (768, 512), "decoder_pred.bias": (768,)}
    for i in range(12):
        shapes.update(_block_keys(f"blocks.{i}", 768))
    for j in range(8):
        shapes.update(_block_keys(f"decoder_blocks.{j}", 512))
    return shapes


def test_official_mae_state_dict_loads_strictly():
    torch.manual_seed(0)
    official = {k: torch.randn(shape) for k, shape in official_mae_vit_base_shapes().items()}
    model = create_model("mae_vit_base_patch16")
    model.load_state_dict(official, strict=True)
    assert torch.equal(model.blocks[3].attn.qkv.weight, official["blocks.3.attn.qkv.weight"])


@pytest.mark.parametrize("global_pool", [True, False])
def test_official_encoder_loads_into_vit(global_pool):
    torch.manual_seed(0)
    full = {k: torch.randn(shape) for k, shape in official_mae_vit_base_shapes().items()}
    encoder_only = {k: v for k, v in full.items() if not k.startswith(("decoder", "mask_token"))}
    for state in (full, encoder_only):  # the released *_full.pth and encoder-only files
        vit = create_model("vit_base_patch16", num_classes=10, global_pool=global_pool)
        missing = load_pretrained_encoder(vit, state)
        expected_missing = {"head.weight", "head.bias"} | ({"fc_norm.weight", "fc_norm.bias"} if global_pool else set())
        assert set(missing) == expected_missing
        assert torch.equal(vit.blocks[11].mlp.fc2.weight, state["blocks.11.mlp.fc2.weight"])
        assert torch.equal(vit.pos_embed, state["pos_embed"])
        if not global_pool:
            assert torch.equal(vit.norm.weight, state["norm.weight"])


def test_encoder_load_resizes_position_table_and_names_shape_mismatch():
    mae = create_model("mae_vit_tiny_patch4")  # 32 px: 8x8 grid
    vit = create_model("vit_tiny_patch4", img_size=48, num_classes=10)  # 12x12 grid
    load_pretrained_encoder(vit, mae.state_dict())
    assert vit.pos_embed.shape == (1, 145, 192)
    other = create_model("vit_small_patch4", num_classes=10)
    with pytest.raises(ValueError, match=r"shape mismatch at 'cls_token': checkpoint \(1, 1, 192\), model \(1, 1, 384\)"):
        load_pretrained_encoder(other, mae.state_dict())


def test_fixed_position_tables_are_not_trained_and_init_follows_mae():
    model = create_model("mae_vit_tiny_patch4")
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    assert torch.all(model.pos_embed[0, 0] == 0)
    assert torch.all(model.blocks[0].attn.qkv.bias == 0)
    assert torch.all(model.norm.weight == 1)
    # Xavier-uniform bound for the qkv Linear: sqrt(6 / (fan_in + fan_out))
    bound = (6 / (192 + 3 * 192)) ** 0.5
    assert model.blocks[0].attn.qkv.weight.abs().max() <= bound


def test_unknown_model_name_lists_choices():
    with pytest.raises(ValueError, match="unknown model 'mae_vit_gigantic'.*mae_vit_base_patch16"):
        create_model("mae_vit_gigantic")


def test_batchnorm_head_ignores_a_per_feature_offset_that_layernorm_keeps():
    """The fine-tuning option --head_batchnorm: in training mode the head's logits do not change when every
    image's features move by the same per-feature offset, however large; behind a LayerNorm they do, and the
    part that varies between images shrinks by the offset's spread."""
    torch.manual_seed(0)
    features = torch.randn(32, 16)
    offset = 30.0 * torch.randn(16)  # MAE's pooled features after a short schedule: mean ~9 std off 0
    head = batchnorm_head(torch.nn.Linear(16, 4)).train()
    assert isinstance(head[0], torch.nn.BatchNorm1d) and head[0].affine is False
    assert torch.allclose(head(features + offset), head(features), atol=1e-4)
    assert list(dict(head.named_parameters())) == ["1.weight", "1.bias"]  # still a linear classifier
    layer_norm = torch.nn.LayerNorm(16)
    between_images = lambda x: layer_norm(x).std(0).mean().item()  # noqa: E731
    assert between_images(features + offset) < 0.1 * between_images(features)
