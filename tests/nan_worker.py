"""main_pretrain.py whose MAE loss turns NaN from the N-th forward call on (N = argv[1]), for tests."""
import sys

import torch

import main_pretrain
import models_mae
from util.config import parse_with_config

if __name__ == "__main__":
    poison_from = int(sys.argv[1])
    original_forward = models_mae.MaskedAutoencoderViT.forward
    calls = 0

    def poisoned_forward(self, imgs, noise=None):
        global calls
        calls += 1
        out = original_forward(self, imgs, noise)
        if calls < poison_from:
            return out
        nan = torch.tensor(float("nan"))
        return models_mae.PretrainOutput(out.loss * nan, {"rec": out.terms["rec"] * nan}, out.features)

    models_mae.MaskedAutoencoderViT.forward = poisoned_forward
    main_pretrain.main(parse_with_config(main_pretrain.get_args_parser(), sys.argv[2:]))
