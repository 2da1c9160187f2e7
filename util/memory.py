"""The memory of a training step (pre-training or fine-tuning), from a count of what autograd keeps for the backward.

`count_step_memory` runs one forward of the model on the CPU at a small batch, under the autocast dtype the step
would use, with `torch.autograd.graph.saved_tensors_hooks` recording every tensor that autograd saves (each
storage once; the parameters themselves are counted apart). Each saved byte is attributed to the transformer
block running when it was saved, so the count also gives what `--grad_checkpointing` keeps: the other saves, each
block's input, and one block's saves at a time (recomputed in the backward).

On a GPU, fp16 and bf16 activations are both 2 bytes, so a bf16 count on the CPU is the fp16 count of a V100.
The step's peak is then about
    parameters x 16 bytes (fp32 weights, gradients, AdamW's two moments) + 2 bytes (autocast's half copies)
    + batch x saved bytes per image x (1 + TRANSIENT) + the CUDA context,
where TRANSIENT is a margin for the backward's activation gradients in flight and the CUDA caching allocator's
fragmentation. tests/test_memory.py checks the count against the live peak of real CPU steps (measured / counted
1.02-1.04, with and without checkpointing); the margin has not been measured on a GPU.
"""
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

TRANSIENT = 0.25  # in-flight activation gradients (2-4% on the CPU) and allocator slack, as a share of the saved activations
CUDA_CONTEXT_BYTES = 0.6 * 2**30  # CUDA context, cuBLAS/cuDNN workspaces and the allocator's slack


@dataclass(frozen=True)
class StepMemory:
    """Bytes of one training step: `fixed` does not depend on the batch; the rest are per image."""

    parameters: int  # trainable parameter count
    saved_per_image: float  # activations autograd keeps, per image, no checkpointing
    checkpointed_per_image: float  # the same with --grad_checkpointing
    largest_block_per_image: float  # one block's saves (what checkpointing recomputes at a time)

    @property
    def fixed(self) -> float:
        return self.parameters * (16 + 2) + CUDA_CONTEXT_BYTES

    def peak(self, batch_size: int, grad_checkpointing: bool = False) -> float:
        per_image = self.checkpointed_per_image if grad_checkpointing else self.saved_per_image
        return self.fixed + batch_size * per_image * (1 + TRANSIENT)

    def max_batch(self, capacity_bytes: float, grad_checkpointing: bool = False) -> int:
        """The largest per-process batch whose estimated peak fits `capacity_bytes`."""
        per_image = (self.checkpointed_per_image if grad_checkpointing else self.saved_per_image) * (1 + TRANSIENT)
        return max(0, math.floor((capacity_bytes - self.fixed) / per_image))


def memory_warning(memory: StepMemory, batch_size: int, grad_checkpointing: bool, capacity_bytes: float) -> str | None:
    """A warning, with what to change, when the step's estimated peak exceeds the device's memory; else None."""
    peak = memory.peak(batch_size, grad_checkpointing)
    if peak <= capacity_bytes:
        return None
    fits = memory.max_batch(capacity_bytes, grad_checkpointing)
    advice = [f"--batch_size {fits} with a larger --accum_iter keeps the effective batch"] if fits else []
    if not grad_checkpointing:
        advice.append(f"--grad_checkpointing true fits {memory.max_batch(capacity_bytes, True)} per process")
    return (f"--batch_size {batch_size} needs about {peak / 2**30:.1f} GiB per process (an estimate from what autograd "
            f"saves, util/memory.py), but the device has {capacity_bytes / 2**30:.1f} GiB: "
            + ("; ".join(advice) if advice else "the model alone does not fit"))


def _blocks(model: nn.Module) -> list[nn.Module]:
    return [block for name in ("blocks", "decoder_blocks") for block in getattr(model, name, [])]


@contextmanager
def _recording(model: nn.Module):
    """Yield (saved bytes by block index, -1 for outside any block; each block's input bytes) while active."""
    saved: dict[int, int] = {}
    inputs: dict[int, int] = {}
    seen: set[int] = {p.untyped_storage().data_ptr() for p in model.parameters()}
    current = [-1]

    def pack(tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen and storage.nbytes() > 0:
            seen.add(storage.data_ptr())
            saved[current[0]] = saved.get(current[0], 0) + storage.nbytes()
        return tensor

    handles = []
    for index, block in enumerate(_blocks(model)):
        def enter(module, args, index=index):
            current[0] = index
            inputs[index] = inputs.get(index, 0) + args[0].numel() * args[0].element_size()

        def leave(module, args, output):
            current[0] = -1

        handles += [block.register_forward_pre_hook(enter), block.register_forward_hook(leave)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield saved, inputs
    finally:
        for handle in handles:
            handle.remove()


def _count(model: nn.Module, input_size: int, amp_dtype, batch_size: int) -> tuple[int, list[int], int]:
    """(bytes saved outside the blocks, bytes saved in each block, bytes of the blocks' inputs) of one forward."""
    device = next(model.parameters()).device
    views = getattr(model, "views_per_image", 1)  # CMAE: two views of each image
    images = torch.randn(batch_size, *((views,) if views > 1 else ()), 3, input_size, input_size, device=device)
    # a pre-training model takes each image's masking noise; a classifier (fine-tuning) the images alone
    noise = (torch.rand(batch_size, model.noise_per_sample, device=device),) if hasattr(model, "noise_per_sample") else ()
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    with _recording(model) as (saved, inputs), autocast:
        model(images, *noise)
    return saved.get(-1, 0), [saved.get(i, 0) for i in range(len(_blocks(model)))], sum(inputs.values())


def count_step_memory(model: nn.Module, input_size: int, amp_dtype: torch.dtype | None = torch.bfloat16,
                      batch_size: int = 2) -> StepMemory:
    """Count what one training forward of `model` saves per image, on the model's device under autocast to
    `amp_dtype` (fp32 with None), as the difference between `batch_size` and 2 x `batch_size` images: what does
    not grow with the batch (autocast's half-precision copies of the weights, kept for the backward) cancels out."""
    model.train()
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}  # BatchNorm statistics move
    rng = torch.get_rng_state()
    small, large = _count(model, input_size, amp_dtype, batch_size), _count(model, input_size, amp_dtype, 2 * batch_size)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    torch.set_rng_state(rng)  # the count leaves the run's random stream where it was
    outside, per_block, block_inputs = ((b - a) / batch_size for a, b in
                                        ((small[0], large[0]), (sum(small[1]), sum(large[1])), (small[2], large[2])))
    largest = max((b - a) / batch_size for a, b in zip(small[1], large[1])) if small[1] else 0.0
    model.zero_grad(set_to_none=True)
    return StepMemory(parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
                      saved_per_image=outside + per_block,
                      checkpointed_per_image=outside + block_inputs + largest,
                      largest_block_per_image=largest)
