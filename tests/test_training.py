"""End-to-end runs of the scripts on a tiny image folder: resume, accumulation, torchrun (one node and two), fine-tune,
probe."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import _free_port, finish_script, run_script, start_script
from PIL import Image

from util.visualize import PADDING


def pretrain_flags(data: Path, out: Path, **overrides) -> list[str]:
    flags = {"model": "mae_vit_tiny_patch4", "data_path": data, "output_dir": out, "input_size": 32,
             "batch_size": 8, "epochs": 2, "warmup_epochs": 1, "blr": 1e-3, "num_workers": 0, "amp": "none",
             "save_freq": 1, "vis_freq": 2, "print_freq": 2, "seed": 3, "online_probe": "true", "knn_freq": 1}
    flags.update(overrides)
    return [item for key, value in flags.items() for item in (f"--{key}", str(value))] + ["--norm_pix_loss"]


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


def weights(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state["model"] if "model" in state else state


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if atol == 0.0:
            assert torch.equal(a[key], b[key]), f"{key} differs"
        else:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=f"{key} differs")


@pytest.fixture(scope="module")
def straight_run(tiny_imagefolder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    run_script(["tests/pretrain_worker.py", *pretrain_flags(tiny_imagefolder, out)])
    return out


def test_outputs_of_a_run(straight_run):
    log = read_log(straight_run)
    assert [r["epoch"] for r in log] == [0, 1]
    assert {"train_loss", "train_lr", "train_rec", "train_probe_ce", "train_probe_acc", "test_knn_acc1"} <= set(log[0])
    # the total is the reconstruction plus the probe's cross-entropy (the probe sees detached features)
    assert log[1]["train_loss"] == pytest.approx(log[1]["train_rec"] + log[1]["train_probe_ce"], rel=1e-5)
    assert [p.name for p in straight_run.glob("reconstruction-*.png")] == ["reconstruction-0001.png"]
    with Image.open(straight_run / "reconstruction-0001.png") as picture:  # 3 rows of 8 tiles of 32 px shown at 96, labelled
        assert picture.height == 3 * (96 + PADDING) + PADDING and picture.width > 8 * (96 + PADDING) + 50
    assert (straight_run / "checkpoint-last.pth").is_file() and (straight_run / "checkpoint-0.pth").is_file()
    assert list(straight_run.glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(straight_run))
    events.Reload()  # TensorBoard gets what log.txt gets, the k-NN monitor included
    assert {"train/rec", "train/probe_acc", "test/knn_acc1"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("test/knn_acc1")] == [0, 1]
    checkpoint = torch.load(straight_run / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["args"]["model"] == "mae_vit_tiny_patch4"
    assert set(checkpoint["online_probe"]) == {"0.running_mean", "0.running_var", "0.num_batches_tracked", "1.weight", "1.bias"}
    assert not list(straight_run.glob(".checkpoint-*.tmp"))
    # rank 0's returned model is what the checkpoint holds
    assert_same_weights(checkpoint["model"], weights(straight_run / "rank0.pt"))


def test_args_yaml_passed_back_as_config_reproduces_the_resolved_arguments(straight_run):
    """args.yaml holds what the run used (the effective lr, the precision as it ran, the code version), and
    read back as a preset it resolves to the same arguments: only `config` (the file given) and the code
    version (the new run records its own) are not taken from it."""
    import yaml

    from main_pretrain import get_args_parser
    from util.config import parse_with_config
    from util.dist import DistInfo
    from util.dry_run import DRY_RUN_FLAGS
    from util.precision import resolve_precision
    from util.registry import other_methods_flags
    from util.run import set_effective_lr

    saved = yaml.safe_load((straight_run / "args.yaml").read_text())
    assert saved["lr"] == pytest.approx(1e-3 * 8 / 256) and saved["amp"] == "none" and saved["code_version"]
    checkpoint = torch.load(straight_run / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert checkpoint["args"]["lr"] == saved["lr"] and checkpoint["git_sha"] == saved["code_version"]
    again = parse_with_config(get_args_parser(), ["--config", str(straight_run / "args.yaml")])
    resolve_precision(again, torch.device("cpu"))
    set_effective_lr(again, DistInfo())
    again = vars(again)
    assert again["config"] == str(straight_run / "args.yaml") and "code_version" not in again
    differing = {key for key in saved if key not in ("config", "code_version") and again[key] != saved[key]}
    # args.yaml leaves out the other methods' flags, which the run never read
    # and the dry run's flags, which a run that trains does not read
    assert not differing and set(again) - other_methods_flags(saved["model"]) - set(DRY_RUN_FLAGS) == set(saved) - {"code_version"}


def test_resume_is_bit_identical(straight_run, tiny_imagefolder, tmp_path):
    """2 epochs straight == 1 epoch, then a new process resuming from that checkpoint for the second."""
    shutil.copy(straight_run / "checkpoint-0.pth", tmp_path / "checkpoint-last.pth")
    (tmp_path / "log.txt").write_text((straight_run / "log.txt").read_text().splitlines()[0] + "\n")
    result = run_script(["tests/pretrain_worker.py", *pretrain_flags(tiny_imagefolder, tmp_path)])
    assert "resumed from" in result.stdout
    assert [r["epoch"] for r in read_log(tmp_path)] == [0, 1]
    assert_same_weights(weights(tmp_path / "checkpoint-last.pth"), weights(straight_run / "checkpoint-last.pth"))


def test_gradient_accumulation_matches_large_batch(straight_run, tiny_imagefolder, tmp_path):
    """batch 4 x accum_iter 2 sees the same samples and masks as batch 8: same weights up to float error."""
    run_script(["tests/pretrain_worker.py", *pretrain_flags(tiny_imagefolder, tmp_path, batch_size=4, accum_iter=2)])
    assert_same_weights(weights(tmp_path / "checkpoint-last.pth"), weights(straight_run / "checkpoint-last.pth"), atol=2e-5)


@pytest.mark.slow
def test_torchrun_two_gloo_ranks_match_one_process(straight_run, tiny_imagefolder, tmp_path):
    """2 ranks x batch 4 == 1 process x batch 8: identical weights across ranks, same loss and weights as 1 process,
    the online probe's (global BatchNorm) and the k-NN monitor's (each rank encodes a shard) figures too."""
    run_script(["tests/pretrain_worker.py", *pretrain_flags(tiny_imagefolder, tmp_path, batch_size=4)], torchrun=2)
    rank0, rank1 = weights(tmp_path / "rank0.pt"), weights(tmp_path / "rank1.pt")
    assert_same_weights(rank0, rank1)
    single = weights(straight_run / "checkpoint-last.pth")
    assert_same_weights(rank0, single, atol=2e-5)
    for ours, reference in zip(read_log(tmp_path), read_log(straight_run)):
        assert ours["train_rec"] == pytest.approx(reference["train_rec"], rel=1e-5)
        assert ours["train_probe_ce"] == pytest.approx(reference["train_probe_ce"], rel=1e-4)
        assert ours["test_knn_acc1"] == reference["test_knn_acc1"]


@pytest.mark.slow
def test_two_torchrun_nodes_form_one_group_and_match_one_process(straight_run, tiny_imagefolder, tmp_path):
    """Two torchrun launchers on this machine as the two nodes of one job (--nnodes 2, one process each) meet at
    a c10d rendezvous on 127.0.0.1: ranks 0 and 1 of one group of 2, which at batch 4 each train as 1 process at 8."""
    endpoint = f"127.0.0.1:{_free_port()}"
    launchers = [start_script([
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
        "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "two_nodes", "--local_addr", "127.0.0.1",
        # node 0 hosts the rendezvous store, node 1 joins it (both would otherwise race to bind the port)
        "--rdzv_conf", f"is_host={int(node == 0)}",
        "tests/pretrain_worker.py", *pretrain_flags(tiny_imagefolder, tmp_path, batch_size=4)]) for node in (0, 1)]
    results = [finish_script(launcher, timeout=300) for launcher in launchers]
    for node, result in enumerate(results):
        assert result.returncode == 0, f"node {node} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    # the world is 2 (effective batch 4 x 2) and each node ran one of its two ranks
    assert "effective batch: 8" in results[0].stdout + results[1].stdout
    rank0, rank1 = weights(tmp_path / "rank0.pt"), weights(tmp_path / "rank1.pt")
    assert_same_weights(rank0, rank1)
    assert_same_weights(rank0, weights(straight_run / "checkpoint-last.pth"), atol=2e-5)
    for ours, reference in zip(read_log(tmp_path), read_log(straight_run), strict=True):
        assert ours["train_rec"] == pytest.approx(reference["train_rec"], rel=1e-5)


def test_finetune_and_linprobe_from_the_pretrained_checkpoint(straight_run, tiny_imagefolder, tmp_path):
    common = ["--data_path", str(tiny_imagefolder), "--input_size", "32", "--model", "vit_tiny_patch4",
              "--finetune", str(straight_run / "checkpoint-last.pth"), "--num_workers", "0", "--epochs", "2",
              "--warmup_epochs", "1", "--batch_size", "8", "--amp", "none"]
    run_script(["main_finetune.py", *common, "--output_dir", str(tmp_path / "ft"), "--mixup", "0.8", "--cutmix", "1.0",
                "--eval_freq", "2"])
    for variant, flags in (("probe", []), ("probe_cached", ["--cached_features", "true"])):
        result = run_script(["main_linprobe.py", *common, "--output_dir", str(tmp_path / variant), *flags])
        assert "linear probe: top-1" in result.stdout
    for folder in ("ft", "probe", "probe_cached"):
        log = read_log(tmp_path / folder)
        assert [r["epoch"] for r in log] == [0, 1]
        assert 0.0 <= log[-1]["test_acc1"] <= log[-1]["test_acc5"] <= 100.0
    assert "test_acc1" not in read_log(tmp_path / "ft")[0]  # --eval_freq 2: epoch 0 is not evaluated, the last is
    assert "test_acc1" in read_log(tmp_path / "probe")[0]
    # the cached probe also logs the k-NN of its frozen features, measured once before training
    knn = [r["test_knn_acc1"] for r in read_log(tmp_path / "probe_cached")]
    assert knn[0] == knn[1] and 0.0 <= knn[0] <= 100.0 and "test_knn_acc1" not in read_log(tmp_path / "probe")[0]
    # the probe trains only the head: the encoder in its checkpoint equals the pre-trained one
    probe = weights(tmp_path / "probe" / "checkpoint-last.pth")
    pretrained = weights(straight_run / "checkpoint-last.pth")
    assert torch.equal(probe["blocks.0.attn.qkv.weight"], pretrained["blocks.0.attn.qkv.weight"])
    assert set(k for k in probe if k.startswith("head.")) == {"head.0.running_mean", "head.0.running_var",
                                                              "head.0.num_batches_tracked", "head.1.weight", "head.1.bias"}


def test_finetune_head_batchnorm_round_trips_and_needs_the_flag_to_resume(straight_run, tiny_imagefolder, tmp_path):
    common = ["--data_path", str(tiny_imagefolder), "--input_size", "32", "--model", "vit_tiny_patch4",
              "--finetune", str(straight_run / "checkpoint-last.pth"), "--num_workers", "0", "--epochs", "1",
              "--warmup_epochs", "1", "--batch_size", "8", "--amp", "none", "--output_dir", str(tmp_path / "ft")]
    run_script(["main_finetune.py", *common, "--head_batchnorm", "true"])
    state = weights(tmp_path / "ft" / "checkpoint-last.pth")
    assert {k for k in state if k.startswith("head.")} == {"head.0.running_mean", "head.0.running_var",
                                                          "head.0.num_batches_tracked", "head.1.weight", "head.1.bias"}
    assert state["head.0.num_batches_tracked"] == 4  # 32 images at batch 8: the statistics were fitted
    # --eval of the fine-tuned checkpoint scores what the last epoch logged (the running statistics came back)
    evaluation = run_script(["main_finetune.py", *common, "--head_batchnorm", "true", "--eval"])
    logged = read_log(tmp_path / "ft")[-1]["test_acc1"]
    assert f"* acc@1 {logged:.3f}" in evaluation.stdout
    # without the flag the checkpoint's head does not fit the model: a clear error, nothing overwritten
    before = (tmp_path / "ft" / "checkpoint-last.pth").read_bytes()
    failed = run_script(["main_finetune.py", *common, "--eval"], check=False)
    assert failed.returncode != 0 and "--head_batchnorm False (checkpoint: True)" in failed.stderr + failed.stdout
    assert (tmp_path / "ft" / "checkpoint-last.pth").read_bytes() == before


def test_cached_probe_on_two_ranks_sees_every_image_once(straight_run, tiny_imagefolder, tmp_path):
    """Each rank encodes its shard and gets the whole feature set back: the probe then trains on every image (not
    a shard of a shard) and the k-NN, taken before training, equals one process's."""
    common = ["main_linprobe.py", "--data_path", str(tiny_imagefolder), "--input_size", "32", "--model", "vit_tiny_patch4",
              "--finetune", str(straight_run / "checkpoint-last.pth"), "--num_workers", "0", "--epochs", "1",
              "--warmup_epochs", "0", "--batch_size", "4", "--amp", "none", "--cached_features", "true", "--knn_k", "3"]
    run_script([*common, "--output_dir", str(tmp_path / "one")])
    run_script([*common, "--output_dir", str(tmp_path / "two")], torchrun=2)
    one, two = read_log(tmp_path / "one")[-1], read_log(tmp_path / "two")[-1]
    assert one["train_images"] == two["train_images"] == 32
    assert two["test_knn_acc1"] == pytest.approx(one["test_knn_acc1"], abs=1e-6)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_imagefolder, tmp_path):
    """32 images / batch 8 = 4 steps an epoch: the 6th forward is step 1 of epoch 1."""
    result = run_script(["tests/nan_worker.py", "6", *pretrain_flags(tiny_imagefolder, tmp_path, save_freq=0)], check=False)
    assert result.returncode != 0
    assert "non-finite loss term(s) ['loss', 'rec'] at step 1 of this epoch" in result.stderr
    assert [r["epoch"] for r in read_log(tmp_path)] == [0]
    checkpoint = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert checkpoint["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())


def test_clip_grad_leaves_out_the_online_probe(shallow_models, tiny_imagefolder, tmp_path):
    """A passive probe must not change training: under --clip_grad the model's weights are bitwise those of the run
    without --online_probe (MI-MAE, whose V is left out of the clipping too), and the clipping did act."""
    import main_pretrain
    from util.config import parse_with_config

    def train(name: str, **overrides) -> dict[str, torch.Tensor]:
        flags = pretrain_flags(tiny_imagefolder, tmp_path / name, model="mi_mae_vit_tiny_patch4", epochs=1, warmup_epochs=0,
                               blr=1e-2, knn_freq=0, vis_freq=0, save_freq=0, **overrides)
        return main_pretrain.main(parse_with_config(main_pretrain.get_args_parser(), flags)).state_dict()

    clipped_with_probe = train("probe", online_probe="true", clip_grad=0.05)
    clipped_without_probe = train("no_probe", online_probe="false", clip_grad=0.05)
    assert_same_weights(clipped_with_probe, clipped_without_probe)
    unclipped = train("unclipped", online_probe="false")
    assert not torch.equal(unclipped["blocks.0.attn.qkv.weight"], clipped_without_probe["blocks.0.attn.qkv.weight"])
