"""The one place that reads the launcher's environment: plain python (a world of one), torchrun or SLURM."""
import builtins
import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.rendezvous import rendezvous


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def read_launcher_env() -> DistInfo:
    """Ranks from torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or SLURM (SLURM_PROCID/...); else a world of one.

    SLURM is read only when MASTER_ADDR is set (the submitit launcher sets it from the node list), so an
    interactive `python main_pretrain.py` inside an allocation still runs as a single process.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "MASTER_ADDR" in env:
        return DistInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return DistInfo()


_info = DistInfo()


def init_distributed(device: str = "cuda", timeout_s: int = 1800) -> tuple[DistInfo, torch.device]:
    """Join the process group if launched with several processes (NCCL on GPU, gloo on CPU).

    Returns the rank info and the device this process computes on. Only rank 0 prints afterwards
    (`print(..., force=True)` prints from any rank).
    """
    global _info
    _info = read_launcher_env()
    use_cuda = device.startswith("cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(_info.local_rank)
        compute_device = torch.device("cuda", _info.local_rank)
    else:
        compute_device = torch.device("cpu")
    if _info.distributed:
        os.environ.setdefault("MASTER_PORT", "29500")
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            store=_store_of_this_attempt(_info, timeout),
            rank=_info.rank,
            world_size=_info.world_size,
            timeout=timeout,
            device_id=compute_device if use_cuda else None,
        )
    _silence_non_main_ranks(_info.rank == 0)
    return _info, compute_device


def _store_of_this_attempt(info: DistInfo, timeout: datetime.timedelta) -> Optional[dist.Store]:
    """Under torchrun, the env:// store with keys prefixed by the restart count; elsewhere None (env:// as usual).

    torchrun's agent keeps one store across `--max-restarts` restarts, so a restarted rank could read the peer
    addresses that the previous attempt's ranks published there, connect to a dead process and fail ("Gloo
    connectFullMesh failed ... Connection refused"); a prefix per attempt keeps every attempt to its own keys.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return None
    store, _, _ = next(rendezvous("env://", info.rank, info.world_size, timeout=timeout))
    store.set_timeout(timeout)  # as init_process_group does with the store it makes itself
    return dist.PrefixStore(f"default_pg_attempt_{attempt}", store)


def _silence_non_main_ranks(is_main: bool) -> None:
    builtin_print = builtins.print

    def print_on_main(*args, **kwargs):
        if kwargs.pop("force", False) or is_main:
            builtin_print(*args, **kwargs)

    builtins.print = print_on_main


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a copy); a single process gets its own values."""
    return all_reduce_sum(tensor) / get_world_size()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy); the identity for a single process. NCCL needs `tensor` on this rank's GPU."""
    return _all_reduce(tensor, dist.ReduceOp.SUM)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over ranks (a copy); the identity for a single process."""
    return _all_reduce(tensor, dist.ReduceOp.MAX)


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
    if get_world_size() == 1:
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=op)
    return tensor


def cleanup() -> None:
    """Tear the process group down on every rank together, so that no rank destroys its group while a peer is
    still working (likely cause of a SIGABRT, "terminate called without an active exception", seen once in CI
    in a 2-rank gloo test while rank 0 wrote its file; not reproduced locally)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class _GatherWithGradientSum(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums the incoming gradient over ranks, then takes the local slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_shards(tensor: torch.Tensor, total: int) -> torch.Tensor:
    """The `total` rows of a whole data set from every rank's shard of an unshuffled DistributedSampler, in the
    data set's order. Rank r holds rows r, r + W, r + 2W, ... of the index list padded to a multiple of W (equal
    shards), so interleaving the shards and dropping the padding restores it. NCCL gathers on this rank's GPU;
    the result is on `tensor`'s device. One process: the tensor itself."""
    world = get_world_size()
    if world == 1:
        return tensor
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else tensor.device
    local = tensor.to(device).contiguous()
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local)
    return torch.stack(parts, dim=1).flatten(0, 1)[:total].to(tensor.device)


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Rows of every rank, concatenated in rank order (W·n, ...), differentiable.

    The backward all-reduces (sums) the gradient, so with DDP's gradient averaging a loss on the gathered
    rows gets exactly the single-process gradient on the same global batch; a gather whose backward only
    keeps the local slice scales that gradient by 1/W. Equal row counts on every rank are assumed. With
    one process (no process group) this is the identity.
    """
    if get_world_size() == 1:
        return tensor
    return _GatherWithGradientSum.apply(tensor)
