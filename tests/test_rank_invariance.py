"""N ranks train what one process trains: 2 gloo ranks x B/2 images against 1 process x B images, for each
method's default pattern, after 3 optimizer steps of the whole training script (data, masks, DDP, the
global BatchNorm of every head, CLUB's standardisation, the gathered negatives, MI-MAE's V steps, the online
probe).

The measure is the whole weight vector, ||w_2 - w_1|| / ||w_1|| <= 1e-4: per tensor misleads, since a
parameter whose gradient is zero in exact arithmetic (a key bias under softmax) gets float noise, which Adam
turns into steps of the size of the lr. Measured with these settings (2026-12-06): MAE 3.6e-7, MI-MAE 3.6e-6
(patch level) and 4.5e-6 (mask level), CMAE 4.2e-6, U-MAE 5.0e-7, M-MAE 4.5e-7. That is float noise of the
summation order: one process against itself at 2 threads instead of 1 differs by 1.3e-5 (MI-MAE, mask level).
InfoNCE with per-rank negatives, a different objective, reads 6e-3 (the last test: the measure tells them apart)."""
import pytest
import torch
from conftest import run_script

from tools.count_collectives import PATTERNS  # each method's default pattern

STEPS_FLAGS = ["--input_size", "32", "--epochs", "1", "--warmup_epochs", "0", "--blr", "1e-2", "--subset_size", "24",
               "--num_workers", "0", "--amp", "none", "--vis_freq", "0", "--print_freq", "1", "--norm_pix_loss",
               "--online_probe", "true", "--seed", "0"]  # 24 images / global batch 8 = 3 optimizer steps
GLOBAL_BATCH = 8

# Beyond each method's pattern: MI-MAE's CLUB bound acting; CMAE's second epoch cropping inside the boxes computed after the first (each rank
# scores its shard of the images), and MI-MAE accumulating 2 micro-batches of 4 images per optimizer step (DDP's
# no_sync; the global BatchNorm still reads each micro-batch whole).
CASES = {**{name: (flags, GLOBAL_BATCH) for name, flags in PATTERNS.items()},
         "cmae_box_update": ([*PATTERNS["cmae"], "--epochs", "2", "--box_warmup", "0", "--box_update_freq", "1"], GLOBAL_BATCH),
         "mi_mae_accum_iter_2": ([*PATTERNS["mi_mae"], "--accum_iter", "2"], GLOBAL_BATCH // 2),
         # the gate is shut while V is at its initialisation: ungated, the CLUB bound's gradient (through the batch's
         # all-reduced moments) reaches the encoder; --club_candidates image reads per-image moments, no collective
         "mi_mae_ungated": ([*PATTERNS["mi_mae"], "--club_gate", "0"], GLOBAL_BATCH)}
PER_RANK_NEGATIVES = ["--model", "mi_mae_vit_tiny_patch4", "--nce_gather", "false"]


def weight_vector(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """Every floating-point tensor of a state dict (weights and BatchNorm statistics), as one float64 vector."""
    return torch.cat([value.double().flatten() for value in state.values() if value.is_floating_point()])


def train_on_two_ranks_and_one(flags: list[str], data, out, global_batch: int = GLOBAL_BATCH) -> tuple[dict, dict, dict]:
    """Final weights of rank 0 and rank 1 (2 ranks x B/2) and of one process x B, B = `global_batch`."""
    common = ["tests/pretrain_worker.py", *STEPS_FLAGS, *flags, "--data_path", str(data)]
    run_script([*common, "--batch_size", str(global_batch // 2), "--output_dir", str(out / "two")], torchrun=2)
    run_script([*common, "--batch_size", str(global_batch), "--output_dir", str(out / "one")])
    load = lambda path: torch.load(path, weights_only=True)  # noqa: E731
    return load(out / "two" / "rank0.pt"), load(out / "two" / "rank1.pt"), load(out / "one" / "rank0.pt")


def relative_difference(state: dict, reference: dict) -> float:
    assert state.keys() == reference.keys()
    return ((weight_vector(state) - weight_vector(reference)).norm() / weight_vector(reference).norm()).item()


@pytest.mark.slow
@pytest.mark.parametrize("pattern", list(CASES))
def test_two_ranks_train_what_one_process_trains(pattern, tiny_imagefolder, tmp_path):
    flags, global_batch = CASES[pattern]
    rank0, rank1, single = train_on_two_ranks_and_one(flags, tiny_imagefolder, tmp_path, global_batch)
    # every buffer too: the global BatchNorm moves its running statistics identically on every rank
    assert all(torch.equal(rank0[key], rank1[key]) for key in rank0), "the ranks' weights differ"
    difference = relative_difference(rank0, single)
    print(f"{pattern}: ||w_2 - w_1|| / ||w_1|| = {difference:.2e}")  # pytest -s shows the measured tolerance
    assert difference <= 1e-4


@pytest.mark.slow
def test_the_measure_tells_a_per_rank_objective_apart(tiny_imagefolder, tmp_path):
    """--nce_gather false (each rank's negatives only) is another objective: it must fail the measure above."""
    rank0, _, single = train_on_two_ranks_and_one(PER_RANK_NEGATIVES, tiny_imagefolder, tmp_path)
    assert relative_difference(rank0, single) > 1e-3
