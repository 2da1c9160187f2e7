"""Each rank computes MI-MAE's loss (its defaults: gathered negatives, global BatchNorm and CLUB moments) on its
half of a fixed batch; gradients averaged like DDP are saved by rank 0 (for tests/test_mi_mae_distributed.py)."""
import sys

import torch
import torch.distributed as dist

from util.dist import cleanup
from util.registry import create_model


def fixed_batch(size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(size, 3, 32, 32, generator=generator), torch.rand(size, 64, generator=generator)


def model_gradients(images: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    # the defaults: the projector's global BatchNorm and CLUB's standardisation take the global batch's moments
    model = create_model("mi_mae_vit_tiny_patch4", norm_pix_loss=True)
    model(images, noise).loss.backward()
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    images, noise = fixed_batch()
    rows = images.shape[0] // world
    grads = model_gradients(images[rank * rows:(rank + 1) * rows], noise[rank * rows:(rank + 1) * rows])
    for grad in grads.values():  # what DDP does
        dist.all_reduce(grad)
        grad /= world
    if rank == 0:
        torch.save(grads, sys.argv[1])
    cleanup()
