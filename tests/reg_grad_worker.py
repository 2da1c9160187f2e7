"""Each rank computes lambda * R(gather(z)) with z = a Linear layer's output on its half of a fixed batch and
averages the layer's weight gradient like DDP (all_reduce / W); rank 0 saves them for tests/test_regularizers.py.
Every case runs twice: with util.dist.gather_with_grad and with the official repositories' gather."""
import sys
from functools import partial
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from util.dist import _GatherWithGradientSum, cleanup, gather_with_grad
from util.regularizers import tcr_loss, uniformity_loss

REG_LAMBDA = 0.5
GLOBAL_BATCH = 8
# name: (feature dimension d, regulariser); m = GLOBAL_BATCH rows once gathered
CASES: dict[str, tuple[int, Callable[[torch.Tensor], torch.Tensor]]] = {
    "uniformity": (4, uniformity_loss),
    "tcr_m_greater_than_d": (4, partial(tcr_loss, mu=1.5)),
    "tcr_m_less_than_d_centered": (16, partial(tcr_loss, mu=1.5, center=True)),
}


def fixed_inputs() -> torch.Tensor:
    return torch.randn(GLOBAL_BATCH, 5, generator=torch.Generator().manual_seed(1))


def weight_gradient(inputs: torch.Tensor, dim: int, regularizer: Callable, gather: Callable) -> torch.Tensor:
    """d(lambda R(gather(layer(inputs)))) / d layer.weight, for a layer seeded identically on every rank."""
    torch.manual_seed(0)
    layer = nn.Linear(inputs.shape[1], dim)
    (REG_LAMBDA * regularizer(gather(layer(inputs)))).backward()
    return layer.weight.grad


class OfficialGather(_GatherWithGradientSum):
    """U-MAE's and M-MAE's GatherLayer: the same all_gather, but a backward that keeps only this rank's slice."""

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = GLOBAL_BATCH // world
    local = fixed_inputs()[rank * rows:(rank + 1) * rows]
    grads = {}
    for name, (dim, regularizer) in CASES.items():
        grads[name] = weight_gradient(local, dim, regularizer, gather_with_grad)
        grads[f"official_{name}"] = weight_gradient(local, dim, regularizer, OfficialGather.apply)
    for grad in grads.values():  # what DDP does
        dist.all_reduce(grad)
        grad /= world
    if rank == 0:
        torch.save(grads, sys.argv[1])
    cleanup()
