"""The declared effective batch on any number of processes (util/batch.py) and `--dry_run` (util/dry_run.py):
the plan against a brute-force search, every preset at 8-64 GPUs, the MI-MAE recipe through the submitit launcher at
1-8 nodes, refusals that name valid choices, the FLOP count against a ViT's closed form, and the GPU-hour estimate
against the times MAE publishes for its own commands."""
import itertools
import re
from pathlib import Path

import pytest
import yaml

import main_finetune
import main_linprobe
import main_pretrain
from util.batch import nearest_world_sizes, plan_batch
from util.config import parse_with_config
from util.dry_run import forward_flops, plan_lines
from util.registry import create_model
from util.submit import launch

ROOT = Path(__file__).resolve().parent.parent
PRESETS = sorted((ROOT / "configs").glob("**/*.yaml"))
SCRIPTS = {"pretrain": main_pretrain, "finetune": main_finetune, "linprobe": main_linprobe}
MI_MAE_PRESET = "configs/mi_mae/pretrain_vit_base_in1k_400ep.yaml"


def brute_force(effective: int, world: int, batch: int) -> tuple[int, int] | None:
    """(per-process batch, accum) with the smallest accumulation whose exact split fits `batch`; None if none."""
    for accum in range(1, effective + 1):
        if effective % (world * accum) == 0 and effective // (world * accum) <= batch:
            return effective // (world * accum), accum
    return None


def test_the_plan_is_exact_and_takes_the_smallest_accumulation():
    reason = "the regulariser reads the gathered micro-batch"
    for effective, world, batch in itertools.product((64, 1000, 1024, 4096, 16384), (1, 3, 7, 8, 16, 24, 32, 64),
                                                     (16, 32, 100, 512)):
        expected = brute_force(effective, world, batch)
        if effective % world:  # the only case without an exact plan (accum = effective / world puts 1 image each)
            assert expected is None
            with pytest.raises(ValueError, match="processes") as error:
                plan_batch(effective, world, batch, None)
            named = re.search(r"run on (\d+)(?: or (\d+))? processes", str(error.value)).groups()
            assert all(effective % int(w) == 0 for w in named if w)
            continue
        plan = plan_batch(effective, world, batch, None)
        assert (plan.batch_size, plan.accum_iter, plan.effective) == (*expected, effective)
        # the per-process batch follows an explicit accumulation, and a whole-batch method keeps accum 1
        if effective % (world * 2) == 0 and effective // (world * 2) <= batch:
            assert plan_batch(effective, world, batch, 2).batch_size == effective // (world * 2)
        if effective // world <= batch:
            whole = plan_batch(effective, world, batch, None, reason)
            assert (whole.batch_size, whole.accum_iter) == (effective // world, 1)
        else:
            with pytest.raises(ValueError, match=f"{reason}.*more than --batch_size {batch}"):
                plan_batch(effective, world, batch, None, reason)
    assert plan_batch(0, 8, 32, None).effective == 256 and plan_batch(0, 8, 32, 4).effective == 1024  # MAE's rule
    assert nearest_world_sizes(1024, 24) == [16, 32]


def _script(preset: Path):
    return SCRIPTS[preset.name.split("_")[0]]


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_preset_trains_its_declared_batch_and_lr_on_8_to_64_gpus(preset):
    """Each preset declares its batch, and it holds exactly, with the lr, on 8, 16, 32 and 64 GPUs, or (a CPU
    preset's batch smaller than the GPUs) is refused naming the world sizes that can run it."""
    module = _script(preset)
    args = parse_with_config(module.get_args_parser(), ["--config", str(preset)])
    whole = main_pretrain.whole_batch_of(args) if module is main_pretrain else None
    assert args.effective_batch > 0, "a preset declares its effective batch"
    for world in (8, 16, 32, 64):
        if args.effective_batch % world:  # a CPU preset's small batch (the demo's 16 images) on many GPUs
            assert args.input_size < 224, "every ImageNet-scale preset runs on 8 to 64 GPUs"
            with pytest.raises(ValueError, match=rf"cannot be split over {world} processes.*: run on \d+"):
                plan_batch(args.effective_batch, world, args.batch_size, args.accum_iter, whole)
            continue
        plan = plan_batch(args.effective_batch, world, args.batch_size, args.accum_iter, whole)
        assert plan.effective == args.effective_batch and plan.batch_size <= args.batch_size
        lines = "\n".join(plan_lines(args, plan))
        assert f"lr               {args.blr * args.effective_batch / 256:.3e}" in lines
        if whole is not None:
            assert plan.accum_iter == 1 and plan.micro_batch == args.effective_batch


def _dry_run_launch(nodes: int, *extra: str, report=None) -> list:
    seen = []

    def record(args, world_size, gpus):
        seen.append((args, world_size, [gpu.name for gpu in gpus]))
        return "\n".join(plan_lines(args, plan_batch(args.effective_batch, world_size, args.batch_size, args.accum_iter)))
    launch(main_pretrain.get_args_parser, main_pretrain.validate_args, main_pretrain.main, "mim_test",
           ["--dry_run", "--nodes", str(nodes), "--ngpus", "8", "--use_volta32", "--config", str(ROOT / MI_MAE_PRESET),
            "--data_path", "/nonexistent/imagenet", *extra],
           dry_run=report or record, whole_batch=main_pretrain.whole_batch_of)
    return seen


@pytest.mark.parametrize("nodes,batch,accum", [(1, 32, 4), (2, 32, 2), (4, 32, 1), (8, 16, 1)])
def test_the_mi_mae_recipe_through_submitit_is_1024_images_at_lr_6e4_on_1_to_8_nodes(nodes, batch, accum, capsys):
    """Acceptance 3 of issue 29: `submitit_pretrain.py --dry_run --nodes N --ngpus 8` on the paper's preset."""
    (args, world_size, gpus), = _dry_run_launch(nodes)
    out = capsys.readouterr().out
    assert world_size == 8 * nodes and gpus == ["V100"]  # --use_volta32 prices V100s
    assert f"per-GPU batch    {batch} images x accum_iter {accum}" in out
    assert "effective batch  1024 images" in out and "lr               6.000e-04" in out
    assert "#SBATCH --nodes=%d\n" % nodes in out and "#SBATCH --constraint=volta32gb" in out
    assert "nothing was submitted" in out


def test_a_node_count_that_cannot_make_the_batch_is_refused_naming_the_valid_ones(capsys):
    with pytest.raises(SystemExit):
        _dry_run_launch(3)
    assert re.search(r"1024 is not a multiple of 24.*run on 16 or 32 processes.*--nodes 2 or 4; nothing was submitted",
                     capsys.readouterr().err)


def test_a_whole_batch_method_takes_the_batch_per_gpu_and_refuses_what_does_not_fit(tmp_path):
    """U-MAE's regulariser reads the gathered micro-batch: 1024 on 16 GPUs is 64 each, never accumulated; on 4 GPUs
    it would be 256 each, more than the preset's 128."""
    preset = str(ROOT / "configs/m_mae/pretrain_u_mae_vit_base_in1k_200ep.yaml")
    args = parse_with_config(main_pretrain.get_args_parser(), ["--config", preset])
    plan = plan_batch(args.effective_batch, 16, args.batch_size, args.accum_iter, main_pretrain.whole_batch_of(args))
    assert (plan.batch_size, plan.accum_iter) == (64, 1)
    with pytest.raises(ValueError, match=r"uniformity regulariser .* puts 256 images on each process, more than "
                                         r"--batch_size 128: run on 8 processes or more"):
        plan_batch(args.effective_batch, 4, args.batch_size, args.accum_iter, main_pretrain.whole_batch_of(args))
    with pytest.raises(ValueError, match="--accum_iter 2: the uniformity regulariser"):
        plan_batch(args.effective_batch, 8, args.batch_size, 2, main_pretrain.whole_batch_of(args))


def test_a_run_resolves_its_batch_at_start_up_and_records_it(tiny_imagefolder, tmp_path):
    """One process, --effective_batch 8 with at most 4 images: accum_iter 2, and args.yaml says so."""
    flags = ["--model", "mae_vit_tiny_patch4", "--input_size", "32", "--data_path", str(tiny_imagefolder),
             "--batch_size", "4", "--effective_batch", "8", "--epochs", "1", "--warmup_epochs", "0", "--blr", "1e-3",
             "--num_workers", "0", "--device", "cpu", "--amp", "none", "--vis_freq", "0", "--output_dir", str(tmp_path)]
    main_pretrain.main(parse_with_config(main_pretrain.get_args_parser(), flags))
    saved = yaml.safe_load((tmp_path / "args.yaml").read_text())
    assert (saved["batch_size"], saved["accum_iter"], saved["effective_batch"]) == (4, 2, 8)
    assert saved["lr"] == pytest.approx(1e-3 * 8 / 256)
    assert not {"dry_run", "world_size", "dry_run_gpu"} & set(saved)


def test_a_dry_run_writes_nothing_and_prices_each_gpu(tiny_imagefolder, tmp_path, capsys):
    out_dir = tmp_path / "out"
    flags = ["--model", "mi_mae_vit_tiny_patch4", "--input_size", "32", "--num_masks", "4", "--batch_size", "16",
             "--effective_batch", "64", "--epochs", "3", "--subset_size", "1000", "--output_dir", str(out_dir),
             "--dry_run", "--world_size", "2"]
    args = parse_with_config(main_pretrain.get_args_parser(), flags)
    main_pretrain.validate_args(args, main_pretrain.get_args_parser())  # no --data_path needed to price a run
    assert main_pretrain.main(args) is None
    out = capsys.readouterr().out
    assert not out_dir.exists()
    assert "per-GPU batch    16 images x accum_iter 2" in out and "1,000 images per epoch" in out
    for gpu, precision in (("V100", "fp16 + GradScaler"), ("A100", "bf16"), ("H100", "bf16")):
        assert re.search(rf"on {gpu} +{re.escape(precision)}; memory ~[\d.]+ of \d+ GiB per GPU \(fits\); "
                         rf"~(<)?[\d.,]+ GPU-hours", out), gpu
    bf16 = parse_with_config(main_pretrain.get_args_parser(), [*flags, "--amp", "bf16", "--dry_run_gpu", "sm_70"])
    main_pretrain.main(bf16)
    assert "refused: --amp bf16 on V100" in capsys.readouterr().out


def test_the_flop_count_of_a_vit_is_its_closed_form():
    """Patch embedding, then per block 12 N d^2 multiply-adds in the projections and MLP and 2 N^2 d in attention
    (F.scaled_dot_product_attention included), then the head; 2 FLOPs per multiply-add."""
    model = create_model("vit_tiny_patch4", num_classes=10, global_pool=True, img_size=32)
    tokens, width, depth = 65, 192, 12
    closed = 2 * 64 * (4 * 4 * 3) * width + depth * (2 * tokens * 12 * width ** 2 + 4 * tokens ** 2 * width) + 2 * width * 10
    assert forward_flops(model, 32) == closed


# MAE's published commands with their published time: (script, flags, GPUs, hours)
PUBLISHED_TIMES = [
    (main_pretrain, "--nodes 8 --use_volta32 --batch_size 64 --model mae_vit_large_patch16 --norm_pix_loss --mask_ratio 0.75 "
                    "--epochs 800 --warmup_epochs 40 --blr 1.5e-4 --weight_decay 0.05", 64, 42.0),
    (main_finetune, "--nodes 4 --batch_size 32 --model vit_base_patch16 --finetune x.pth --epochs 100 --blr 5e-4 "
                    "--layer_decay 0.65 --weight_decay 0.05 --drop_path 0.1 --reprob 0.25 --mixup 0.8 --cutmix 1.0 --dist_eval",
     32, 7 + 11 / 60),
    (main_linprobe, "--nodes 4 --batch_size 512 --model vit_base_patch16 --cls_token --finetune x.pth --epochs 90 --blr 0.1 "
                    "--weight_decay 0.0 --dist_eval", 32, 2 + 20 / 60),
]


@pytest.mark.parametrize("module,command,gpus,hours", PUBLISHED_TIMES, ids=["pretrain_vit_large", "finetune_vit_base", "linprobe_vit_base"])
def test_the_gpu_hour_estimate_reproduces_the_times_mae_publishes(module, command, gpus, hours, tmp_path, capsys):
    """The MFU of util/dry_run.py is calibrated on these times: a change of the FLOP count or of the cost formula
    shows here. MAE's submitit commands, with --dry_run, priced on V100s."""
    launch(module.get_args_parser, module.validate_args if module is not main_linprobe else main_linprobe.validate_common_args,
           module.main, "x", [*command.split(), "--dry_run", "--data_path", str(tmp_path), "--job_dir", str(tmp_path / "job"),
                              "--output_dir", str(tmp_path / "out"), "--dry_run_gpu", "V100"],
           dry_run=module.dry_run)
    estimate = re.search(rf"GPU-hours = ~([\d.,]+) h on {gpus} GPUs", capsys.readouterr().out)
    assert float(estimate.group(1).replace(",", "")) == pytest.approx(hours, rel=0.03)
