"""lr schedule and layer-wise decay against MAE's closed forms."""
import math
from argparse import Namespace

import pytest
import torch

from util.lr_decay import param_groups_lrd
from util.lr_sched import adjust_learning_rate, lr_at
from util.registry import create_model


def test_warmup_then_cosine():
    base, floor, warmup, epochs = 1e-3, 1e-6, 5, 25
    assert lr_at(0.0, base, floor, warmup, epochs) == 0.0
    assert lr_at(2.5, base, floor, warmup, epochs) == pytest.approx(base / 2)
    assert lr_at(5.0, base, floor, warmup, epochs) == pytest.approx(base)
    assert lr_at(15.0, base, floor, warmup, epochs) == pytest.approx(floor + (base - floor) / 2)
    assert lr_at(25.0, base, floor, warmup, epochs) == pytest.approx(floor)
    e = 11.3
    expected = floor + (base - floor) * 0.5 * (1 + math.cos(math.pi * (e - warmup) / (epochs - warmup)))
    assert lr_at(e, base, floor, warmup, epochs) == pytest.approx(expected)
    values = [lr_at(5 + i * 0.5, base, floor, warmup, epochs) for i in range(41)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_adjust_learning_rate_applies_lr_scale():
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [p1]}, {"params": [p2], "lr_scale": 0.5}], lr=1.0)
    args = Namespace(lr=0.1, min_lr=0.0, warmup_epochs=10, epochs=100)
    lr = adjust_learning_rate(optimizer, 5.0, args)
    assert lr == pytest.approx(0.05)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert optimizer.param_groups[1]["lr"] == pytest.approx(0.025)


@pytest.mark.parametrize("global_pool", [True, False])
def test_layer_decay_matches_mae_numbering(global_pool):
    model = create_model("vit_tiny_patch4", num_classes=10, global_pool=global_pool)
    depth, decay = len(model.blocks), 0.65
    groups = param_groups_lrd(model, weight_decay=0.05, layer_decay=decay)
    scale_of, decay_of = {}, {}
    for group in groups:
        for param in group["params"]:
            scale_of[id(param)], decay_of[id(param)] = group["lr_scale"], group["weight_decay"]
    named = dict(model.named_parameters())
    # MAE: scale = decay^(depth + 1 - layer_id); id 0 embeddings, i + 1 for blocks.i, depth + 1 for the rest
    assert scale_of[id(named["cls_token"])] == pytest.approx(decay ** (depth + 1))
    assert scale_of[id(named["patch_embed.proj.weight"])] == pytest.approx(decay ** (depth + 1))
    assert scale_of[id(named["blocks.0.attn.qkv.weight"])] == pytest.approx(decay ** depth)
    assert scale_of[id(named[f"blocks.{depth - 1}.mlp.fc1.weight"])] == pytest.approx(decay)
    assert scale_of[id(named["head.weight"])] == pytest.approx(1.0)
    assert decay_of[id(named["head.weight"])] == 0.05
    assert decay_of[id(named["head.bias"])] == 0.0
    assert decay_of[id(named["cls_token"])] == 0.0 and decay_of[id(named["pos_embed"])] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(named)
