"""The one place that reads the launcher's environment (plain python, a world of one; torchrun; SLURM), and the
collectives that make N ranks train what one process trains and stop together:

- `global_mean_var` and `GlobalBatchNorm1d`: batch statistics over every rank's rows, with their gradient;
- `gather_with_grad`: negatives from every rank;
- `stop_together`: whatever stops one rank stops every rank within seconds, each naming the cause and the rank;
- `broadcast_object`: a choice made on rank 0 (the checkpoint to resume) used by every rank.
"""
import builtins
import datetime
import inspect
import os
import sys
import threading
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
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
_store: Optional[dist.Store] = None  # the rendezvous store, also the side channel of `stop_together`


def init_distributed(device: str = "cuda", timeout_s: int = 1800) -> tuple[DistInfo, torch.device]:
    """Join the process group if launched with several processes (NCCL on GPU, gloo on CPU).

    Returns the rank info and the device this process computes on. Only rank 0 prints afterwards
    (`print(..., force=True)` prints from any rank).
    """
    global _info, _store
    _info = read_launcher_env()
    _store = None
    use_cuda = device.startswith("cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(_info.local_rank)
        compute_device = torch.device("cuda", _info.local_rank)
    else:
        compute_device = torch.device("cpu")
    if _info.distributed:
        os.environ.setdefault("MASTER_PORT", "29500")
        timeout = datetime.timedelta(seconds=timeout_s)
        _store = _store_of_this_attempt(_info, timeout)
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            store=_store,
            rank=_info.rank,
            world_size=_info.world_size,
            timeout=timeout,
            device_id=compute_device if use_cuda else None,
        )
    _silence_non_main_ranks(_info.rank == 0)
    return _info, compute_device


def _store_of_this_attempt(info: DistInfo, timeout: datetime.timedelta) -> dist.Store:
    """The env:// store (MASTER_ADDR:MASTER_PORT), with keys prefixed by torchrun's restart count.

    torchrun's agent keeps one store across `--max-restarts` restarts, so a restarted rank could read the peer
    addresses that the previous attempt's ranks published there, connect to a dead process and fail ("Gloo
    connectFullMesh failed ... Connection refused"); a prefix per attempt keeps every attempt to its own keys
    (its fault reports included). Under torchrun the store lives in the agent, so it outlives a dead rank 0.
    """
    store, _, _ = next(rendezvous("env://", info.rank, info.world_size, timeout=timeout))
    store.set_timeout(timeout)  # as init_process_group does with the store it makes itself
    return dist.PrefixStore(f"default_pg_attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}", store)


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
    _FaultWatcher.stop()  # before the barrier: once a rank is past it, rank 0 (the store's host, off torchrun) may exit
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def data_parallel(module: nn.Module, device: torch.device) -> nn.parallel.DistributedDataParallel:
    """DDP over `module` on this rank's device, without DDP's broadcast of rank 0's buffers before every forward:
    the only buffers here, BatchNorm's running statistics, move by the global batch's moments (GlobalBatchNorm1d) and
    are the same on every rank, so the broadcast is one collective a step for nothing. (torch >= 2.12 names the
    option forward_sync_buffers; the buffers are still synchronised once, at construction.)"""
    options = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    no_broadcast = {"forward_sync_buffers": False} if "forward_sync_buffers" in options else {"broadcast_buffers": False}
    return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                               **no_broadcast)


def broadcast_object(value: Any) -> Any:
    """Rank 0's `value` on every rank (a picklable object); one process: `value` itself."""
    if get_world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_gather_object(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order; one process: [value]."""
    if get_world_size() == 1:
        return [value]
    values = [None] * get_world_size()
    dist.all_gather_object(values, value)
    return values


# ---------------------------------------------------------------- batch statistics over every rank


def global_mean_var(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column mean and biased variance of `rows` (n, D) over the rows of every rank, in float32 at least.

    Differentiable: the backward of each all-reduce sums the gradient over ranks, so with DDP's averaging a loss
    that reads these moments gets the single-process gradient on the global batch. Two passes (mean, then the
    squared deviations from it), as one process computes them: no cancellation in E[x^2] - E[x]^2. Ranks may
    hold different row counts. One process: the local moments, no collective."""
    rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
    if get_world_size() == 1:
        return rows.mean(0), rows.var(0, unbiased=False)
    count = torch.full((1,), rows.shape[0], dtype=rows.dtype, device=rows.device)
    sums = _AllReduceSum.apply(torch.cat([rows.sum(0), count]))
    total = sums[-1]
    mean = sums[:-1] / total
    var = _AllReduceSum.apply((rows - mean).square().sum(0)) / total
    return mean, var


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the incoming gradient over ranks too (every rank's loss reads the sum)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the global batch (every rank's rows), on any backend:
    NCCL on GPUs and gloo on CPUs alike (nn.SyncBatchNorm runs on GPUs only), so one implementation serves every
    launch. Without it, a projector's BatchNorm on W ranks normalises each rank's B/W rows apart, which both
    changes the objective with the GPU count and lets a contrastive loss find an image's other views by their
    shared per-rank statistics (the leak MoCo v3 and SimCLR close with a global BatchNorm). The running
    statistics move by the global moments (unbiased variance, as nn.BatchNorm1d), identical on every rank.
    One process, or evaluation: nn.BatchNorm1d itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and get_world_size() > 1):
            return super().forward(x)
        if x.ndim != 2:
            raise ValueError(f"GlobalBatchNorm1d takes (N, C) rows, got {tuple(x.shape)}")
        mean, var = global_mean_var(x)
        out = (x.to(mean.dtype) - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            out = out * self.weight + self.bias
        if self.track_running_stats:
            with torch.no_grad():
                total = float(x.shape[0] * get_world_size())  # DistributedSampler: equal rows on every rank
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                unbiased = var * (total / max(total - 1.0, 1.0))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        return out.to(x.dtype)


# ---------------------------------------------------------------- one rank's failure stops every rank


class _FaultWatcher:
    """A daemon thread on every rank that polls the store for another rank's fault report; when one comes it
    prints it, acknowledges it and ends this process at once (exit status 1), even while the main thread waits
    in a collective that the failed rank will never join (NCCL would wait out --dist_timeout)."""

    POLL_S = 0.5
    _thread: Optional[threading.Thread] = None
    _stopping = threading.Event()

    @classmethod
    def start(cls) -> None:
        if _store is None or cls._thread is not None:
            return
        cls._stopping.clear()
        cls._thread = threading.Thread(target=cls._watch, name="fault-watcher", daemon=True)
        cls._thread.start()

    @classmethod
    def stop(cls) -> None:
        if cls._thread is not None:
            cls._stopping.set()
            cls._thread.join()
            cls._thread = None

    @classmethod
    def _watch(cls) -> None:
        while not cls._stopping.wait(cls.POLL_S):
            try:
                report = _read_fault_report()
            except Exception:  # the store's host is gone: the collectives fail on their own
                return
            if report is not None and report[0] != _info.rank:
                sys.stdout.flush()
                sys.stderr.write(_stop_line(*report) + "\n")  # not print: non-main ranks' print is silenced
                sys.stderr.flush()
                _acknowledge()
                os._exit(1)


_FAULT_KEY = "run_fault"


def _read_fault_report() -> Optional[tuple[int, str]]:
    if _store is None or not _store.check([_FAULT_KEY]):
        return None
    rank, _, message = _store.get(_FAULT_KEY).decode().partition("\n")
    return int(rank), message


def _acknowledge() -> None:
    try:
        _store.set(f"{_FAULT_KEY}_ack_{_info.rank}", "1")
    except Exception:
        pass


def _stop_line(rank: int, message: str) -> str:
    return f"[rank {_info.rank}] stopping: rank {rank} of {_info.world_size} failed: {message}"


def _report_fault(message: str, ack_timeout_s: float = 5.0) -> Optional[tuple[int, str]]:
    """Publish this rank's fault unless another rank's came first (which is returned), then wait up to
    `ack_timeout_s` for the other ranks to read it, so that they have said why before this process exits."""
    value = f"{_info.rank}\n{message}"
    first = _store.compare_set(_FAULT_KEY, "", value).decode()
    if first != value:
        rank, _, other = first.partition("\n")
        return int(rank), other
    others = [f"{_FAULT_KEY}_ack_{rank}" for rank in range(_info.world_size) if rank != _info.rank]
    try:
        _store.wait(others, datetime.timedelta(seconds=ack_timeout_s))
    except Exception:  # a rank that died without a word cannot acknowledge
        pass
    return None


@contextmanager
def stop_together() -> Iterator[None]:
    """Around a distributed run: an exception on one rank (a refused image, a failed checkpoint write, running out
    of memory, a rank that cannot read the checkpoint) is published in the store before it propagates; every other
    rank's watcher then prints it and exits within about a second, instead of dying on "Connection closed by peer"
    (gloo) or waiting out --dist_timeout (NCCL). The exception gets a note naming its rank. An exception whose
    `raised_on_every_rank` is true (a collective check, like the finite-loss check) is already seen by every rank
    and is left alone. One process: nothing is added."""
    if _store is None:
        yield
        return
    _FaultWatcher.start()
    try:
        yield
    except BaseException as err:
        if getattr(err, "raised_on_every_rank", False):
            raise
        _FaultWatcher.stop()
        message = "".join(traceback.format_exception_only(type(err), err)).strip().splitlines()[-1]
        earlier = _report_fault(message)
        if earlier is not None:  # e.g. a collective that failed because that rank had gone: name the cause
            _acknowledge()
            _last_line(err, _stop_line(*earlier))
        else:
            _last_line(err, f"[rank {_info.rank}] this error on rank {_info.rank} of {_info.world_size} stops every rank")
        raise


def _last_line(err: BaseException, line: str) -> None:
    """Make `line` the last line Python prints for `err` (a traceback's note; a SystemExit's own message)."""
    if isinstance(err, SystemExit):
        if isinstance(err.code, str):
            err.code = f"{err.code}\n{line}"
    else:
        err.add_note(line)


def raised_on_every_rank(err: BaseException) -> BaseException:
    """Mark `err` as raised by every rank together (after a collective check): `stop_together` lets it pass."""
    err.raised_on_every_rank = True
    return err


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
