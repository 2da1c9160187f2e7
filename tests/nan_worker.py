"""main_pretrain.py whose MAE loss turns NaN from the N-th forward call on (N = argv[1]), for tests."""
import sys

from fault_worker import poisoned_forward  # tests/ is this script's folder

import main_pretrain
import models_mae
from util.config import parse_with_config

if __name__ == "__main__":
    poison_from = int(sys.argv[1])
    models_mae.MaskedAutoencoderViT.forward = poisoned_forward(lambda call: call >= poison_from)
    main_pretrain.main(parse_with_config(main_pretrain.get_args_parser(), sys.argv[2:]))
