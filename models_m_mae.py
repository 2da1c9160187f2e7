"""U-MAE (Zhang et al., NeurIPS 2022) and M-MAE (Tan et al., ICML 2024): MAE plus lambda times a regulariser of the
cls features of the same masked forward pass, gathered over all ranks.

- U-MAE: the squared-cosine uniformity of the batch, `util.regularizers.uniformity_loss`.
- M-MAE: the negative total coding rate -log det(I + mu/d Z^T Z), `util.regularizers.tcr_loss`. Its second-order
  expansion in mu is U-MAE's term, so one class serves both and `reg` picks the term; `u_mae_*` and `m_mae_*`
  are the same class with reg='uniformity' and reg='tcr'.

Where the papers and the official code differ this follows the code (docs/methods/m_mae.md): the cls
feature gets the encoder's final LayerNorm a second time (`reg_double_norm`), mu/d not mu/m, no 1/2. The gather
here sums gradients over ranks, so lambda means the same at any world size: lambda_here = lambda_official / W.
No parameters are added, so the keys are MAE's and checkpoints fine-tune and probe like MAE ones.
"""
import argparse
from typing import Optional

import torch

from engine_pretrain import PretrainOutput
from models_mae import MaskedAutoencoderViT, build_mae, mae_model_kwargs
from util.dist import gather_with_grad
from util.regularizers import tcr_loss, uniformity_loss
from util.spec import Knob, Method, model_factory

REGULARIZERS = ("none", "uniformity", "tcr")


# --reg values of both official repositories (any case) -> this class's terms. U-MAE selects its loss for any
# value but none (its choices: none, entropy, spectral); M-MAE's choices are none, square (U-MAE's loss), TCR.
REG_FLAG_VALUES = {"none": "none", "uniformity": "uniformity", "tcr": "tcr",
                   "spectral": "uniformity", "entropy": "uniformity", "square": "uniformity"}


def regularizer_name(value: str) -> str:
    """argparse type of --reg: an official or own name -> 'none', 'uniformity' or 'tcr'."""
    name = REG_FLAG_VALUES.get(value.lower())
    if name is None:
        raise argparse.ArgumentTypeError(f"expected one of {sorted(REG_FLAG_VALUES)} (any case), got {value!r}")
    return name


# Both methods share one set of knobs, and so one group of flags (util/spec.py).
REGULARIZER_KNOBS = (
    Knob('reg', None,
         'regulariser: uniformity (U-MAE), tcr (M-MAE) or none (MAE that still logs both terms); default: '
         "the model's, uniformity for u_mae_*, tcr for m_mae_*. Official values work: U-MAE's spectral and"
         " entropy and M-MAE's square are the uniformity loss, M-MAE's TCR is tcr",
         type=regularizer_name),
    Knob('reg_lambda', 0.01,
         "lambda in loss = rec + lambda R. The official gather drops the other ranks' gradient, so its "
         'lambda acts as lambda/W: to reproduce an official run on W GPUs pass lambda_official / W (0.01 /'
         " 8 = 1.25e-3 for the released 8-GPU scripts); R also depends on the regulariser's batch m = "
         'batch_size x processes (not x accum_iter)',
         aliases=('lamb',), interval='[0, inf)'),
    Knob('tcr_mu', 1.0,
         'mu in R = -log det(I + mu/d Z^T Z) (M-MAE; d = feature dim, as the official code, not the '
         "paper's m); larger is stronger. Official: 1 for ViT-B, 3 for ViT-L (its pretrain.sh spells the "
         'flag --uniformity_lamda)',
         aliases=('uniformity_mu', 'uniformity_lamda'), interval='(0, inf)'),
    Knob('tcr_center', False,
         'centre the gathered unit features in the TCR (Z^T J Z, J = I - 11^T/m); the flag alone means '
         "true, and the official script's '--centering False' means off (a reading: its older type=bool "
         'flag read that as true)',
         aliases=('centering',), bare=True),
    Knob('reg_double_norm', True,
         "apply the encoder's final LayerNorm a second time to the cls feature seen by the regulariser and"
         ' the online probe, as the official models do; false: the single-normed cls token that fine-'
         'tuning and probing use'),
)


class RegularizedMAE(MaskedAutoencoderViT):
    """loss = rec + reg_lambda * R(c), c = the cls features of the masked pass, R chosen by `reg`."""

    knobs = REGULARIZER_KNOBS

    def __init__(self, *, reg: str, reg_lambda: float, tcr_mu: float, tcr_center: bool, reg_double_norm: bool, **kwargs):
        super().__init__(**kwargs)
        self.reg, self.reg_lambda = reg, reg_lambda
        self.tcr_mu, self.tcr_center, self.reg_double_norm = tcr_mu, tcr_center, reg_double_norm

    def regularized_features(self, cls: torch.Tensor) -> torch.Tensor:
        """c (B, D) from the encoder's cls output; the official models apply the (already applied) final norm again."""
        return self.norm(cls) if self.reg_double_norm else cls

    def regularizers(self, gathered: torch.Tensor) -> dict[str, torch.Tensor]:
        """Both terms on the gathered features: the selected one keeps its graph, the other is only a monitor."""

        def rows(name: str) -> torch.Tensor:
            return gathered if self.reg == name else gathered.detach()

        return {"uniformity": uniformity_loss(rows("uniformity")),
                "tcr": tcr_loss(rows("tcr"), self.tcr_mu, self.tcr_center)}

    def forward(self, imgs: torch.Tensor, noise: Optional[torch.Tensor] = None) -> PretrainOutput:
        rec, terms, cls = super().forward(imgs, noise)
        features = self.regularized_features(cls)
        # every rank's rows, in rank order; the backward sums the gradient over ranks (identity for one process)
        values = self.regularizers(gather_with_grad(features))
        reg = values[self.reg] if self.reg != "none" else torch.zeros_like(rec)
        terms = {**terms, "reg": reg.detach(), **{name: value.detach() for name, value in values.items()}}
        return PretrainOutput(rec + self.reg_lambda * reg, terms, features)


def build_regularized_mae(size: str, default_reg: str, **kwargs) -> RegularizedMAE:
    """`RegularizedMAE` at MAE's architecture `size`; a `reg` in kwargs (from --reg) overrides `default_reg`."""
    return build_mae(size, RegularizedMAE, **{"reg": default_reg, **kwargs})


@model_factory
def u_mae_vit_base_patch16(**kwargs) -> RegularizedMAE:
    return build_regularized_mae("vit_base_patch16", "uniformity", **kwargs)


@model_factory
def u_mae_vit_large_patch16(**kwargs) -> RegularizedMAE:
    return build_regularized_mae("vit_large_patch16", "uniformity", **kwargs)


@model_factory
def u_mae_vit_huge_patch14(**kwargs) -> RegularizedMAE:
    return build_regularized_mae("vit_huge_patch14", "uniformity", **kwargs)


@model_factory
def u_mae_vit_tiny_patch4(**kwargs) -> RegularizedMAE:
    return build_regularized_mae("vit_tiny_patch4", "uniformity", **kwargs)


@model_factory
def u_mae_vit_small_patch4(**kwargs) -> RegularizedMAE:
    return build_regularized_mae("vit_small_patch4", "uniformity", **kwargs)


@model_factory
def m_mae_vit_base_patch16(**kwargs) -> RegularizedMAE:
    return build_regularized_mae("vit_base_patch16", "tcr", **kwargs)


@model_factory
def m_mae_vit_large_patch16(**kwargs) -> RegularizedMAE:
    return build_regularized_mae("vit_large_patch16", "tcr", **kwargs)


@model_factory
def m_mae_vit_huge_patch14(**kwargs) -> RegularizedMAE:
    return build_regularized_mae("vit_huge_patch14", "tcr", **kwargs)


@model_factory
def m_mae_vit_tiny_patch4(**kwargs) -> RegularizedMAE:
    return build_regularized_mae("vit_tiny_patch4", "tcr", **kwargs)


@model_factory
def m_mae_vit_small_patch4(**kwargs) -> RegularizedMAE:
    return build_regularized_mae("vit_small_patch4", "tcr", **kwargs)


def validate_regularizer_args(args: argparse.Namespace) -> None:
    """The check that involves the model (each value's own type and range are its knob's)."""
    if args.model.startswith("u_mae_") and args.reg == "tcr":
        raise ValueError(f"--reg tcr is M-MAE's term, but {args.model} is U-MAE: use {args.model.replace('u_mae_', 'm_mae_', 1)}")


def regularizer_run_label(args: dict) -> str:
    """The regulariser actually used names the run: a U-MAE model with --reg tcr is M-MAE, --reg none is MAE."""
    if args["reg"] == "none" or args["reg_lambda"] == 0:
        return "MAE"
    default = "U-MAE" if args["model"].startswith("u_mae_") else "M-MAE"
    return {"uniformity": "U-MAE", "tcr": "M-MAE"}.get(args["reg"], default)


def regularizer_whole_batch(args: argparse.Namespace) -> Optional[str]:
    """The regulariser is a statistic of the gathered micro-batch (its m): accumulation would shrink m below the
    recipe's batch instead of keeping it."""
    if args.reg == "none" or args.reg_lambda == 0:
        return None
    name = args.reg or ("uniformity" if args.model.startswith("u_mae_") else "tcr")
    return f"the {name} regulariser reads the gathered micro-batch as one sample (m = batch_size x processes)"


METHODS = (
    Method(name="U-MAE", prefix="u_mae_", common_kwargs=mae_model_kwargs, knobs=REGULARIZER_KNOBS,
           validate=validate_regularizer_args, run_label=regularizer_run_label, whole_batch=regularizer_whole_batch),
    Method(name="M-MAE", prefix="m_mae_", common_kwargs=mae_model_kwargs, knobs=REGULARIZER_KNOBS,
           validate=validate_regularizer_args, run_label=regularizer_run_label, whole_batch=regularizer_whole_batch),
)
