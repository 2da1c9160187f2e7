"""Training statistics kept on the device and read back only at log intervals (no host sync per step)."""
import time
from typing import Optional

import torch

from util.dist import all_reduce_max, all_reduce_sum, get_rank, get_world_size


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or inf; the message names the term(s), the rank and the step. Raised by every rank
    together (the check is collective), so util.dist.stop_together has nothing to forward."""

    raised_on_every_rank = True


NON_FINITE_ADVICE = "Lower the lr, use --amp bf16 instead of fp16, or set --clip_grad."


def non_finite_terms(names: list[str], rank: int, world: int) -> str:
    """The start of every non-finite-loss message: the terms, and the rank that saw them when there are several."""
    return f"non-finite loss term(s) {names}" + (f" on rank {rank} of {world}" if world > 1 else "")


class RunningTerms:
    """Per-epoch sums of named scalar terms on the device, plus the first step at which any was non-finite.

    A term may appear on some steps only (its mean is over the steps that have it); every rank must log the
    same names at the same step, as the means are all-reduced."""

    def __init__(self, device: torch.device):
        self.device = device
        self.names: list[str] = []
        self.sums = torch.zeros(0, device=device)
        self.counts = torch.zeros(0, device=device)
        self.bad = torch.zeros(0, dtype=torch.bool, device=device)
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self._rows: dict[tuple[str, ...], torch.Tensor] = {}  # a step's names -> their rows, made once per set

    def add(self, terms: dict[str, torch.Tensor], step: int) -> None:
        rows = self._rows.get(tuple(terms))
        if rows is None:
            new = [name for name in terms if name not in self.names]
            if new:
                self.names += new
                self.sums, self.counts = (torch.cat([t, t.new_zeros(len(new))]) for t in (self.sums, self.counts))
                self.bad = torch.cat([self.bad, self.bad.new_zeros(len(new))])
            rows = torch.tensor([self.names.index(name) for name in terms], device=self.device)
            self._rows[tuple(terms)] = rows
        values = torch.stack([value.detach().float() for value in terms.values()])
        finite = torch.isfinite(values)
        newly_bad = (~finite).any() & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(newly_bad, torch.full_like(self.first_bad_step, step), self.first_bad_step)
        self.bad[rows] |= ~finite & (self.first_bad_step == step)
        self.sums.index_add_(0, rows, torch.where(finite, values, torch.zeros_like(values)))
        self.counts.index_add_(0, rows, finite.float())  # means over the finite values

    def means(self, raise_non_finite: bool = True) -> dict[str, float]:
        """Means over the epoch so far, averaged over ranks; one all-reduce and one host sync.

        The all-reduce also carries each rank's first non-finite step and terms, so that with `raise_non_finite`
        every rank raises the same NonFiniteLossError, naming the lowest rank that saw one, at the same call:
        no rank is left waiting in a collective for a rank that stopped."""
        return self.means_and_votes([], raise_non_finite)[0]

    def means_and_votes(self, votes: list[float], raise_non_finite: bool = True) -> tuple[dict[str, float], list[float]]:
        """`means`, with this rank's `votes` summed over ranks in the same all-reduce (util.preempt: when to save)."""
        count, world, rank = len(self.names), get_world_size(), get_rank()
        faults = torch.zeros(world, 1 + count, device=self.device)  # per rank: first bad step + 1, bad flags
        faults[rank, 0] = (self.first_bad_step + 1).float()
        faults[rank, 1:] = self.bad.float()
        reduced = all_reduce_sum(torch.cat([self.sums / self.counts.clamp(min=1), faults.flatten(),
                                            torch.tensor(votes, device=self.device)])).tolist()
        votes = reduced[len(reduced) - len(votes):]
        faults = [reduced[count + r * (1 + count):count + (r + 1) * (1 + count)] for r in range(world)]
        bad_rank = next((r for r, row in enumerate(faults) if row[0] > 0), None)
        if raise_non_finite and bad_rank is not None:
            names = [name for name, flag in zip(self.names, faults[bad_rank][1:]) if flag]
            raise NonFiniteLossError(
                f"{non_finite_terms(names, bad_rank, world)} at step {int(faults[bad_rank][0]) - 1} of this epoch; "
                f"the last checkpoint was kept. {NON_FINITE_ADVICE} (--nan_policy skip skips such steps)"
            )
        return {name: value / world for name, value in zip(self.names, reduced[:count])}, votes

    def state_dict(self) -> dict:
        """This rank's sums so far (plain types and CPU tensors): a run resumed inside the epoch adds the rest of
        the epoch to them, so its epoch means are those of the uninterrupted run."""
        return {"names": list(self.names), "sums": self.sums.cpu().clone(), "counts": self.counts.cpu().clone(),
                "bad": self.bad.cpu().clone(), "first_bad_step": int(self.first_bad_step)}  # copies: the sums go on

    def load_state_dict(self, state: dict) -> None:
        self.names = list(state["names"])
        self.sums, self.counts, self.bad = (state[key].to(self.device, copy=True) for key in ("sums", "counts", "bad"))
        self.first_bad_step = torch.tensor(state["first_bad_step"], dtype=torch.long, device=self.device)
        self._rows = {}


class NonFiniteStepSkipper:
    """--nan_policy skip: an optimizer step whose micro-steps saw a non-finite loss or term on any rank is
    dropped (its gradients are zeroed unused) instead of stopping the run; one more than `max_skips` skipped
    steps in the whole run stops it. `skipped` counts them over the run (restored on resume).

    Each micro-step costs one host sync, plus a small all-reduce (a flag per term) when distributed (so that every rank
    skips the same steps); the default policy avoids both by checking only at log intervals.
    """

    def __init__(self, max_skips: int, skipped: int = 0):
        self.max_skips, self.skipped = max_skips, skipped
        self.pending: Optional[str] = None  # what went non-finite in the current accumulation window

    def start_epoch(self) -> int:
        """Forget a window the previous epoch left open (its gradients were zeroed); returns `skipped` so far."""
        self.pending = None
        return self.skipped

    def finite(self, terms: dict[str, torch.Tensor], epoch: int, step: int) -> bool:
        """Whether every term of this micro-step is finite on every rank (remembered for the window if not)."""
        values = torch.stack([value.detach().float() for value in terms.values()])
        world = get_world_size()
        bad = torch.zeros(world, len(terms), dtype=torch.int32, device=values.device)
        bad[get_rank()] = (~torch.isfinite(values)).to(torch.int32)
        bad = all_reduce_max(bad).tolist()
        bad_rank = next((r for r, row in enumerate(bad) if any(row)), None)
        if bad_rank is None:
            return True
        if self.pending is None:
            names = [name for name, flag in zip(terms, bad[bad_rank]) if flag]
            self.pending = f"{non_finite_terms(names, bad_rank, world)} at step {step} of epoch {epoch}"
        return False

    def allow_step(self) -> bool:
        """At the end of an accumulation window: True to step the optimizer, False to drop the window's gradients.

        Raises NonFiniteLossError once more than `max_skips` steps have been skipped in the run."""
        if self.pending is None:
            return True
        what, self.pending = self.pending, None
        if self.skipped >= self.max_skips:
            raise NonFiniteLossError(f"{what}, after {self.skipped} skipped optimizer steps (--max_nan_skips "
                                     f"{self.max_skips}); the last checkpoint was kept. {NON_FINITE_ADVICE}")
        self.skipped += 1
        print(f"{what}: optimizer step skipped ({self.skipped} of --max_nan_skips {self.max_skips})", flush=True)
        return False


class Progress:
    """Console progress with elapsed time and ETA, MAE-style."""

    def __init__(self, total: int, header: str):
        self.total, self.header, self.start = total, header, time.time()

    def line(self, step: int, values: dict[str, float]) -> str:
        elapsed = time.time() - self.start
        eta = elapsed / max(step + 1, 1) * (self.total - step - 1)
        shown = "  ".join(f"{k}: {v:.4g}" for k, v in values.items())
        width = len(str(self.total))
        return (f"{self.header} [{step + 1:>{width}}/{self.total}]  eta: {_hms(eta)}  "
                f"elapsed: {_hms(elapsed)}  {shown}")


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def accuracy(logits: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...] = (1,)) -> list[torch.Tensor]:
    """Top-k accuracies in percent, as device tensors."""
    maxk = min(max(topk), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    correct = pred.eq(target.unsqueeze(1))
    return [correct[:, : min(k, maxk)].any(dim=1).float().mean() * 100 for k in topk]
