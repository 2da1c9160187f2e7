"""A new method in one file (docs/ADDING_A_METHOD.md): MAE plus lambda times the mean square of the cls feature
(a made-up regulariser, logged as its own term). Registering it is one call (or one line in util/registry.py's
MODEL_MODULES, or its name in $MIM_METHODS); everything else comes from the registry, the engine and the scripts.

    python examples/toy_method.py --help                 # main_pretrain.py's flags, --toy_lambda among them
    python examples/toy_method.py --model toy_mae_vit_tiny_patch4 --toy_lambda 0.5 --input_size 32 --data_path DATA
    MIM_METHODS=toy_method PYTHONPATH=examples python submitit_pretrain.py --model toy_mae_vit_tiny_patch4 ...
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, when run as a script

from engine_pretrain import PretrainOutput  # noqa: E402
from models_mae import MaskedAutoencoderViT, build_mae, mae_model_kwargs  # noqa: E402
from util.spec import Knob, Method, model_factory  # noqa: E402

TOY_KNOBS = (Knob("toy_lambda", 0.1, "weight of the cls feature's mean square", interval="[0, inf)"),)


class ToyMAE(MaskedAutoencoderViT):
    knobs = TOY_KNOBS

    def __init__(self, *, toy_lambda: float, **kwargs):
        super().__init__(**kwargs)
        self.toy_lambda = toy_lambda

    def forward(self, imgs, noise=None) -> PretrainOutput:
        rec, terms, cls = super().forward(imgs, noise)
        square = cls.float().pow(2).mean()
        return PretrainOutput(rec + self.toy_lambda * square, {**terms, "cls_square": square.detach()}, cls)


@model_factory
def toy_mae_vit_tiny_patch4(**kwargs) -> ToyMAE:
    return build_mae("vit_tiny_patch4", ToyMAE, **kwargs)


METHODS = (Method(name="Toy MAE", prefix="toy_mae_", common_kwargs=mae_model_kwargs, knobs=TOY_KNOBS),)


if __name__ == "__main__":
    from main_pretrain import get_args_parser, main
    from util.config import parse_with_config
    from util.registry import register_module

    register_module("toy_method")
    main(parse_with_config(get_args_parser(), sys.argv[1:]))
