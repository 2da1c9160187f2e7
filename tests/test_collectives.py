"""MI-MAE's extra V steps (--v_steps) cost one all-reduce each, of one flattened buffer of V's gradients (before:
one per parameter tensor, 8 steps x 8 tensors = 64 a step). Counted from a profiler trace of 2 gloo ranks
(tools/count_collectives.py, whose table for every method is in docs/PERFORMANCE.md)."""
import pytest

from tools.count_collectives import PATTERNS, collective_counts, tiny_image_folder


@pytest.mark.slow
def test_each_extra_v_step_is_one_all_reduce(tmp_path):
    data = tiny_image_folder(tmp_path / "data")
    steps = 2
    counts = {}
    for v_steps in (2, 6):
        work = tmp_path / f"v{v_steps}"
        work.mkdir()
        counts[v_steps] = collective_counts([*PATTERNS["mi_mae"], "--v_steps", str(v_steps)], data, work, steps)
    difference = counts[6] - counts[2]
    assert dict(difference) == {"gloo:all_reduce": (6 - 2) * steps}, (counts[2], counts[6])
