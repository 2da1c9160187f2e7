"""The effective batch a recipe declares, on whatever number of processes the run gets.

A preset states its effective batch in images per optimizer step (`--effective_batch`: MI-MAE's 1024, MAE's 4096)
and the most images one process holds (`--batch_size`). At start-up, once the world size is known, the run derives
    effective batch = batch_size x accum_iter x world size
exactly:
- by default `accum_iter` follows: the smallest accumulation that keeps each process at or below `--batch_size`
  with an exact product (on more processes than the recipe needs, the per-process batch drops instead);
- with `--accum_iter` given, the per-process batch follows from it;
- a method whose loss reads the whole gathered batch (U-MAE's and M-MAE's regulariser: its m is the micro-batch,
  not the accumulated one) keeps accum_iter at 1, and the per-process batch follows.
A world size that cannot reach the declared batch exactly is refused before any work, naming the nearest world
sizes that can. `--effective_batch 0` keeps MAE's rule: the product is whatever the three flags give.
"""
import argparse
from dataclasses import dataclass
from typing import Optional

EFFECTIVE_BATCH_HELP = (
    "images per optimizer step over all processes, the recipe's batch (MI-MAE: 1024, MAE: 4096); the run derives "
    "--accum_iter (or, with --accum_iter given, --batch_size) from the world size so that batch_size x accum_iter x "
    "processes equals it exactly, and refuses a world size that cannot, naming the nearest that can. "
    "--batch_size is then the most images per process (what fits in memory). 0: no declared batch, the product is "
    "what the flags give (MAE's rule)")
ACCUM_ITER_HELP = ("accumulate gradients over this many steps; default: derived from --effective_batch (else 1). "
                   "Given with --effective_batch, the per-process batch follows from it instead")


def add_batch_args(group, batch_size: int, batch_help: str) -> None:
    """--batch_size, --accum_iter and --effective_batch, for every script."""
    group.add_argument("--batch_size", default=batch_size, type=int, help=batch_help)
    group.add_argument("--accum_iter", default=None, type=int, help=ACCUM_ITER_HELP)
    group.add_argument("--effective_batch", default=0, type=int, help=EFFECTIVE_BATCH_HELP)


@dataclass(frozen=True)
class BatchPlan:
    """How a run makes its effective batch on `world_size` processes."""

    world_size: int
    batch_size: int  # per process, per micro-step
    accum_iter: int

    @property
    def micro_batch(self) -> int:
        """Images of one forward over all processes: what gathered negatives, global BatchNorm and batch
        regularisers see."""
        return self.batch_size * self.world_size

    @property
    def effective(self) -> int:
        return self.batch_size * self.accum_iter * self.world_size


def nearest_world_sizes(effective: int, world_size: int) -> list[int]:
    """The world sizes closest to `world_size` (one below, one above where they exist) that divide `effective`."""
    below = next((w for w in range(world_size - 1, 0, -1) if effective % w == 0), None)
    above = next((w for w in range(world_size + 1, effective + 1) if effective % w == 0), None)
    return [w for w in (below, above) if w is not None]


def plan_batch(effective: int, world_size: int, batch_size: int, accum_iter: Optional[int],
               whole_batch: Optional[str] = None) -> BatchPlan:
    """The per-process batch and accumulation of a run (module docstring). `whole_batch` says why the method's
    loss must see the whole batch in one micro-step (None: it need not). ValueError naming the flags and the
    nearest valid choices when no exact plan exists."""
    if batch_size < 1 or (accum_iter is not None and accum_iter < 1) or effective < 0 or world_size < 1:
        raise ValueError(f"--batch_size and --accum_iter must be positive and --effective_batch non-negative, got "
                         f"{batch_size}, {accum_iter} and {effective} (world size {world_size})")
    if effective == 0:
        return BatchPlan(world_size, batch_size, accum_iter or 1)
    if effective % world_size:
        choices = " or ".join(str(w) for w in nearest_world_sizes(effective, world_size))
        multiples = sorted({effective - effective % world_size, effective - effective % world_size + world_size} - {0})
        raise ValueError(f"--effective_batch {effective} cannot be split over {world_size} processes ({effective} is "
                         f"not a multiple of {world_size}): run on {choices} processes, or declare "
                         f"--effective_batch {' or '.join(map(str, multiples))} (a different recipe)")
    per_rank = effective // world_size  # images each process handles per optimizer step
    if whole_batch is not None:
        if accum_iter not in (None, 1):
            raise ValueError(f"--accum_iter {accum_iter}: {whole_batch}, so it must be 1 with --effective_batch "
                             f"{effective}; the per-process batch is {per_rank} on {world_size} processes")
        accum_iter = 1
    elif accum_iter is None:
        # the smallest accumulation that fits --batch_size with an exact split (per_rank itself always divides)
        accum_iter = next(a for a in range(-(-per_rank // batch_size), per_rank + 1) if per_rank % a == 0)
    if per_rank % accum_iter:
        raise ValueError(f"--accum_iter {accum_iter} does not divide the {per_rank} images each of {world_size} "
                         f"processes takes per step (--effective_batch {effective}): use a divisor of {per_rank}, "
                         f"or leave --accum_iter out to derive it")
    plan = BatchPlan(world_size, per_rank // accum_iter, accum_iter)
    if plan.batch_size > batch_size:
        why = f" ({whole_batch})" if whole_batch is not None else ""
        need = -(-effective // batch_size)
        raise ValueError(f"--effective_batch {effective} on {world_size} processes with accum_iter {accum_iter}{why} "
                         f"puts {plan.batch_size} images on each process, more than --batch_size {batch_size}: "
                         f"run on {need} processes or more, or raise --batch_size to {plan.batch_size} if it fits "
                         f"in memory")
    return plan


def effective_lr(args: argparse.Namespace, plan: BatchPlan) -> float:
    """MAE's rule: lr = blr x effective batch / 256, unless --lr is given."""
    return args.lr if args.lr is not None else args.blr * plan.effective / 256


def apply_batch_plan(args: argparse.Namespace, world_size: int, whole_batch: Optional[str] = None) -> BatchPlan:
    """Resolve args.batch_size and args.accum_iter in place for `world_size` (args.yaml records what runs);
    SystemExit naming the flags when no exact plan exists."""
    try:
        plan = plan_batch(args.effective_batch, world_size, args.batch_size, args.accum_iter, whole_batch)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if args.effective_batch and (plan.batch_size, plan.accum_iter) != (args.batch_size, args.accum_iter):
        print(f"--effective_batch {plan.effective} on {world_size} process(es): --batch_size {plan.batch_size} x "
              f"--accum_iter {plan.accum_iter}")
    args.batch_size, args.accum_iter = plan.batch_size, plan.accum_iter
    return plan
