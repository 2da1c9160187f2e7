"""util/memory.py's count of what autograd saves, against the CPU's measured peak of real training steps."""
import pytest
import torch

from tools import benchmark
from util.memory import TRANSIENT, StepMemory, count_step_memory, memory_warning
from util.registry import create_model


def measured_mb_per_image(model: str, precision: str, batches: tuple[int, int], *flags: str) -> float:
    """Growth of the step's measured peak (resident high-water mark above the state before the step) per image."""
    steps = []
    for batch in batches:
        args = benchmark.get_args_parser().parse_args(["--model", model, "--batch_size", str(batch), "--precision", precision,
                                                       "--device", "cpu", "--input_size", "32", *flags])
        step, _ = benchmark.build_training_step(args, torch.device("cpu"))
        step()
        steps.append(benchmark.measure_step_memory(step, torch.device("cpu"))[1])
    return (steps[1] - steps[0]) / (batches[1] - batches[0])


@pytest.mark.parametrize("model, precision, batches", [
    ("mae_vit_tiny_patch4", "fp32", (32, 64)),
    ("mae_vit_tiny_patch4", "bf16", (32, 64)),
    ("mi_mae_vit_tiny_patch4", "bf16", (8, 16)),  # 4 masks per image
])
def test_the_count_predicts_the_measured_cpu_peak(model, precision, batches):
    """Seen: measured / predicted 0.95 (fp32), 1.02 (bf16), 0.98 (MI-MAE); ViT-B/16 at 224 px, batch 8 -> 16,
    0.93 in bf16 and 0.87 in fp32 (too slow for the suite)."""
    torch.set_num_threads(1)
    memory = count_step_memory(create_model(model, img_size=32, norm_pix_loss=True), 32,
                               torch.bfloat16 if precision == "bf16" else None)
    predicted = memory.saved_per_image * (1 + TRANSIENT) / 2**20
    measured = measured_mb_per_image(model, precision, batches)
    assert 0.8 <= measured / predicted <= 1.15, (measured, predicted)


def test_checkpointing_keeps_less_but_its_count_is_optimistic():
    """Seen: the measured growth with --grad_checkpointing is 2.6x its count (3.2 against 1.2 MB per image), still
    below the count without it (5.8): the README's checkpointing columns are optimistic until the count is mended."""
    memory = count_step_memory(create_model("mae_vit_tiny_patch4", img_size=32, norm_pix_loss=True), 32, None)
    assert memory.checkpointed_per_image < memory.saved_per_image / 3
    measured = measured_mb_per_image("mae_vit_tiny_patch4", "fp32", (64, 128), "--grad_checkpointing", "true")  # smaller batches: allocator noise
    assert measured < memory.saved_per_image * (1 + TRANSIENT) / 2**20, measured


def test_the_count_leaves_the_model_and_the_random_stream_as_they_were():
    model = create_model("mi_mae_vit_tiny_patch4", img_size=32, norm_pix_loss=True)  # BatchNorm in the projector
    before = {name: value.clone() for name, value in model.state_dict().items()}
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    count_step_memory(model, 32)
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_max_batch_is_the_largest_that_fits_and_the_warning_says_what_to_change():
    memory = StepMemory(parameters=10**8, saved_per_image=50 * 2**20, checkpointed_per_image=10 * 2**20,
                        largest_block_per_image=4 * 2**20)
    capacity = 16 * 2**30
    fits = memory.max_batch(capacity)
    assert memory.peak(fits) <= capacity < memory.peak(fits + 1)
    assert memory.max_batch(capacity, grad_checkpointing=True) > 4 * fits
    assert memory_warning(memory, fits, False, capacity) is None
    message = memory_warning(memory, fits + 1, False, capacity)
    assert f"--batch_size {fits} " in message and "--grad_checkpointing true fits" in message
