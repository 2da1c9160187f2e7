"""The one pre-training engine. It knows no method: a model's forward returns (loss, terms, features) and
the engine optimises the loss, logs every term, and optionally trains an online linear probe.

`PretrainModel` lists everything the engine and the scripts use of a model; `check_pretrain_model` checks a
model against it once, when it is built."""
import time
import warnings
from contextlib import nullcontext
from typing import Callable, Iterable, NamedTuple, Optional, Protocol, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F

from util.datasets import IMAGENET_MEAN, IMAGENET_STD
from util.dist import GlobalBatchNorm1d, all_reduce_mean, get_world_size
from util.fast_augment import normalize_on_device
from util.lr_sched import adjust_learning_rate
from util.metrics import NonFiniteStepSkipper, Progress, RunningTerms, accuracy
from util.precision import autocast_for
from util.preempt import MidEpoch, Preempted, SaveTrigger, rng_state, set_rng_state


class PretrainOutput(NamedTuple):
    """What every pre-training model returns.

    loss: scalar to minimise. terms: named detached scalars for logging (the engine logs every one; a term may
    appear on some steps only, its mean is then over the steps that have it).
    features: (B, D) encoder cls features of this pass, for the online probe (the engine detaches them).
    """

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    features: torch.Tensor


@runtime_checkable
class PretrainModel(Protocol):
    """What the engine, main_pretrain.py and the tools use of a pre-training model (MaskedAutoencoderViT has
    it all; a method overrides what differs). An optional `estimator_losses()` yields extra losses of the
    model's own estimator between optimizer steps (MI-MAE's V; see `estimator_steps`)."""

    cls_token: torch.Tensor  # (1, 1, D): D is the width of `features`, for the online probe
    num_patches: int  # patches per image: the visualisation's masking noise
    patch_size: int
    norm_pix_loss: bool
    mask_ratio: float
    noise_per_sample: int  # masking noise values per sample, drawn by util.datasets.SeededDataset
    sequences_per_image: int  # masked sequences through the encoder per image, for compute-matched budgets

    def __call__(self, imgs: torch.Tensor, noise: Optional[torch.Tensor] = None) -> PretrainOutput: ...

    def param_groups(self, weight_decay: float) -> list[dict]: ...  # AdamW groups (a group may set lr_scale, schedule)

    def extract_features(self, imgs: torch.Tensor) -> torch.Tensor: ...  # (B, D) unmasked cls features (k-NN)

    def reconstruct(self, imgs: torch.Tensor, noise: Optional[torch.Tensor] = None): ...  # the reconstruction grids

    def set_grad_checkpointing(self, enable: bool = True) -> None: ...  # --grad_checkpointing


# The protocol's members (typing lists them itself only from Python 3.12 on).
PRETRAIN_MODEL_MEMBERS = (*PretrainModel.__annotations__,
                          *(name for name, value in vars(PretrainModel).items() if callable(value) and not name.startswith("_")))


def check_pretrain_model(model: nn.Module, name: str) -> None:
    """Refuse, naming what is missing, a model that lacks part of `PretrainModel`."""
    missing = [attr for attr in PRETRAIN_MODEL_MEMBERS if not hasattr(model, attr)]
    if missing:
        raise TypeError(f"--model {name}: {type(model).__name__} lacks {missing}, which the engine and the scripts "
                        f"use (engine_pretrain.PretrainModel)")


class PretrainTask(nn.Module):
    """The pre-training model plus an optional online linear probe on its detached cls features.

    One module so that DDP synchronises both; checkpoints store `model` and `online_probe` apart, so the
    model's keys stay MAE's.
    """

    def __init__(self, model: nn.Module, num_classes: int = 0):
        super().__init__()
        self.model = model
        self.probe = None
        if num_classes > 0:
            dim = model.cls_token.shape[-1]
            # BatchNorm without affine + linear: MAE's probe head, robust to the feature scale drifting.
            # Global: its statistics are the whole batch's on any number of ranks.
            self.probe = nn.Sequential(GlobalBatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))

    def estimator_losses(self):
        return self.model.estimator_losses()

    def forward(self, imgs: torch.Tensor, labels: torch.Tensor, noise: Optional[torch.Tensor] = None):
        loss, terms, features = self.model(imgs, noise)
        terms = dict(terms)
        if self.probe is not None:
            logits = self.probe(features.detach().float())
            probe_ce = F.cross_entropy(logits, labels)
            loss = loss + probe_ce  # only the probe receives this gradient
            terms["probe_ce"] = probe_ce.detach()
            terms["probe_acc"] = accuracy(logits.detach(), labels)[0]
        return loss, terms


def train_one_epoch(
    task: nn.Module,
    data_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    epoch: int,
    scaler: Optional[torch.amp.GradScaler],
    args,
    log_writer=None,
    nan_skips: Optional[NonFiniteStepSkipper] = None,
    trigger: Optional[SaveTrigger] = None,
    save_mid_epoch: Optional[Callable[[MidEpoch], None]] = None,
    resume: Optional[MidEpoch] = None,
) -> dict[str, float]:
    """One epoch; returns the epoch means of `loss`, `lr` and every term, averaged over ranks.

    Without `nan_skips` a non-finite term stops the run at the next log interval; with it (--nan_policy skip)
    such steps are skipped and `nan_skips` (the epoch's count) joins the returned stats.

    Inside the epoch (util.preempt): at each --print_freq step the ranks vote, through `trigger`, on saving;
    `save_mid_epoch` then gets this rank's MidEpoch at the first optimizer-step boundary. `resume` (a MidEpoch
    restored from such a save) starts the epoch at its step: `data_loader`'s sampler must already skip the steps
    done, and this rank's random state and running sums are those of the uninterrupted run at that step.
    """
    task.train(True)
    accum_iter = args.accum_iter
    distributed = isinstance(task, nn.parallel.DistributedDataParallel)
    start_step = resume.step if resume is not None else 0
    steps_per_epoch = start_step + len(data_loader)
    running = RunningTerms(device)
    progress = Progress(steps_per_epoch, f"Epoch: [{epoch}]")
    optimizer.zero_grad(set_to_none=True)
    lr = optimizer.param_groups[0]["lr"]
    interval_start, interval_images = time.time(), 0
    skipped_before = nan_skips.start_epoch() if nan_skips is not None else 0
    epoch_start = time.time()
    batches = iter(data_loader)  # draws the workers' base seed from the random state, as in an uninterrupted epoch
    if resume is not None:
        running.load_state_dict(resume.running)
        skipped_before = resume.skipped_before
        epoch_start -= resume.elapsed_s
        set_rng_state(resume.rng)  # now the random state of the uninterrupted run at this step

    for step, batch in enumerate(batches, start=start_step):
        if step % accum_iter == 0:  # the schedule moves per optimizer step, on the fractional epoch
            lr = adjust_learning_rate(optimizer, epoch + step / steps_per_epoch, args)
        imgs, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        imgs = normalize_on_device(imgs, IMAGENET_MEAN, IMAGENET_STD)  # uint8 batches (--data_pipeline fast)
        noise = batch[2].to(device, non_blocking=True) if len(batch) > 2 else None
        boundary = (step + 1) % accum_iter == 0
        # Gradients are all-reduced only on the micro-step that ends an accumulation.
        sync_context = task.no_sync() if distributed and not boundary else nullcontext()
        with sync_context:
            with autocast_for(device, args.amp):
                loss, terms = task(imgs, labels, noise)
            scaled = loss / accum_iter
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        step_terms = {"loss": loss.detach(), **terms}
        if nan_skips is None or nan_skips.finite(step_terms, epoch, step):  # a host sync per step only if skipping
            running.add(step_terms, step)
        if boundary:
            if nan_skips is None or nan_skips.allow_step():
                optimizer_step(task, optimizer, scaler, args.clip_grad)
                estimator_steps(task, optimizer)
            else:
                optimizer.zero_grad(set_to_none=True)
        interval_images += imgs.shape[0]

        if (step + 1) % args.print_freq == 0 or step + 1 == steps_per_epoch:
            # the only host sync of the loop; raises on every rank if one saw a NaN, and counts the votes to save
            means, votes = running.means_and_votes(trigger.vote() if trigger is not None else [])
            if trigger is not None:
                trigger.count(votes)
            elapsed = time.time() - interval_start
            images_per_s = interval_images * get_world_size() / max(elapsed, 1e-9)
            print(progress.line(step, {"lr": lr, **means, "img/s": images_per_s}), flush=True)
            if log_writer is not None:
                epoch_1000x = int((epoch + (step + 1) / steps_per_epoch) * 1000)
                for name, value in means.items():
                    log_writer.add_scalar(f"train/{name}", value, epoch_1000x)
                log_writer.add_scalar("train/lr", lr, epoch_1000x)
                log_writer.add_scalar("train/img_per_s", images_per_s, epoch_1000x)
            interval_start, interval_images = time.time(), 0
        if trigger is not None and trigger.agreed and boundary and step + 1 < steps_per_epoch:
            # the epoch's last step saves with the epoch: checkpoint-last.pth then holds the finished epoch
            save_mid_epoch(MidEpoch(step + 1, rng_state(), running.state_dict(), skipped_before, time.time() - epoch_start))
            trigger.saved()
            if trigger.stop:
                raise Preempted(trigger.signum, f"epoch {epoch} at step {step + 1} of {steps_per_epoch}")

    stats = {"lr": lr, **running.means()}
    if nan_skips is not None:
        stats["nan_skips"] = nan_skips.skipped - skipped_before
    return stats


def clipped_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """What --clip_grad clips: the parameters of every group that does not say `clip: False`. The online probe's
    group and MI-MAE's V say so: a passive probe must not change training, and V's NLL is an estimator's loss,
    whose gradient norm would otherwise set the encoder's clipping factor."""
    return [p for group in optimizer.param_groups if group.get("clip", True) for p in group["params"]]


def optimizer_step(task: nn.Module, optimizer: torch.optim.Optimizer,
                   scaler: Optional[torch.amp.GradScaler], clip_grad: Optional[float]) -> None:
    """Unscale (fp16), clip if asked, step and zero the gradients; no host sync."""
    if scaler is not None:
        if clip_grad:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(clipped_parameters(optimizer), clip_grad)
        scaler.step(optimizer)
        scaler.update()
    else:
        if clip_grad:
            torch.nn.utils.clip_grad_norm_(clipped_parameters(optimizer), clip_grad)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def estimator_steps(task: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Extra updates of a model's own estimator between optimizer steps (MI-MAE's V, --v_steps): the model yields
    each loss, which reaches only the estimator's parameters; only they then step (AdamW skips parameters without
    gradient). Called on the model itself, outside DDP, so their gradients are averaged over ranks here, in one
    all-reduce of one flattened buffer per extra step. Not clipped: see `clipped_parameters`."""
    inner = task.module if isinstance(task, nn.parallel.DistributedDataParallel) else task
    distributed = get_world_size() > 1
    for loss in getattr(inner, "estimator_losses", tuple)():  # a task without an estimator has nothing to do
        loss.backward()
        if distributed:
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            averaged = all_reduce_mean(torch.cat([grad.flatten() for grad in grads]))
            for grad, mean in zip(grads, averaged.split([grad.numel() for grad in grads])):
                grad.copy_(mean.view_as(grad))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def check_one_batch_fits(num_samples: int, batch_size: int, world_size: int) -> None:
    """With drop_last an epoch needs at least one full global batch; say which flag to change if not."""
    if num_samples < batch_size * world_size:
        raise SystemExit(
            f"error: the dataset has {num_samples} images, fewer than one global batch "
            f"(--batch_size {batch_size} x {world_size} processes); lower --batch_size"
        )


def build_optimizer(task: PretrainTask, args) -> torch.optim.Optimizer:
    groups = task.model.param_groups(args.weight_decay)
    if task.probe is not None:  # not clipped by --clip_grad: a passive probe must not change the encoder's steps
        groups.append({"params": list(task.probe.parameters()), "weight_decay": 0.0, "clip": False})
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=True)


def set_fused_attn(model: torch.nn.Module, enabled: bool) -> None:
    """timm's Attention modules read this per instance (F.scaled_dot_product_attention or matmul-softmax-matmul)."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = enabled


def compile_model(model: torch.nn.Module) -> bool:
    """torch.compile `model`'s forward in place, so its state-dict keys stay the same; False, with a warning, where
    torch.compile is unsupported. A graph that fails to compile later (say, no C++ compiler for the CPU backend)
    runs eagerly with a warning instead of stopping the run: dynamo's suppress_errors, set here for the process."""
    try:
        torch._dynamo.config.suppress_errors = True
        model.compile()
    except Exception as err:  # e.g. a Python version that Dynamo does not support yet
        warnings.warn(f"--compile: torch.compile is unavailable here ({err}); the model runs eagerly", stacklevel=2)
        return False
    return True
