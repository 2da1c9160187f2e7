"""The submitit launchers: flags and rendezvous, a run on the local executor, requests checked against sinfo
(a fake sinfo and sbatch on PATH, then the real cluster), and jobs on a real one-node SLURM cluster
(tests/slurm_cluster.sh): a 2-task gloo job, a job pre-empted mid-run that is requeued and resumes, requests no
node can meet refused before submission, and a default CPU submission that runs.

The local run is the reference: a 1-process CPU run with a fixed seed, which any resumed run equals bit for bit.
"""
import json
import os
import re
import subprocess
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import submitit
import torch
from conftest import ROOT, run_script

import main_finetune
import main_linprobe
import main_pretrain
from util.batch import plan_batch
from util.submit import (
    Node,
    Request,
    add_launcher_args,
    check_request,
    gpu_count,
    launch,
    make_executor,
    parse_sinfo,
    split_args,
    torchrun_env,
)

EPOCHS = 4


def pretrain_flags(data: Path, out: Path, *extra: str) -> list[str]:
    flags = {"model": "mae_vit_tiny_patch4", "input_size": 32, "batch_size": 8, "epochs": EPOCHS, "warmup_epochs": 1,
             "num_workers": 0, "amp": "none", "print_freq": 2, "seed": 3, "device": "cpu", "data_path": data,
             "output_dir": out, "timeout": 60, "ngpus": 1}
    return [item for key, value in flags.items() for item in (f"--{key}", str(value))] + list(extra)


def read_epochs(out: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=True)["model"]


@pytest.mark.parametrize("module", [main_pretrain, main_finetune, main_linprobe])
def test_launcher_flags_have_help_and_stay_out_of_the_run_args(module):
    parser = module.get_args_parser()
    launcher_flags = add_launcher_args(parser)
    undocumented = [a.dest for a in parser._actions if a.dest != "help" and not a.help]
    assert not undocumented, f"flags without help text: {undocumented}"
    launcher, args = split_args(parser.parse_args(["--nodes", "2", "--ngpus", "8", "--partition", "gpu"]), launcher_flags)
    assert (launcher.nodes, launcher.ngpus, launcher.partition) == (2, 8, "gpu")
    assert not set(launcher_flags) & set(vars(args)) and "model" in vars(args)


def test_rendezvous_from_a_slurm_job_environment(monkeypatch):
    """Task 9 of a 2-node x 8-task job: the master is the first node of the list, the port follows the job id."""
    for name, value in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]",
                        "SLURM_NTASKS": "16", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_PROCID": "9",
                        "SLURM_LOCALID": "1"}.items():
        monkeypatch.setenv(name, value)
    assert torchrun_env(submitit.JobEnvironment()) == {"MASTER_ADDR": "gpu07", "MASTER_PORT": "24242", "RANK": "9",
                                                      "WORLD_SIZE": "16", "LOCAL_RANK": "1"}


@pytest.fixture(scope="module")
def local_run(tiny_imagefolder, tmp_path_factory) -> Path:
    """submitit_pretrain.py --executor local: the job's task runs on this machine and the launcher waits for it."""
    out = tmp_path_factory.mktemp("local")
    result = run_script(["submitit_pretrain.py", "--executor", "local", *pretrain_flags(tiny_imagefolder, out)])
    assert f"output_dir: {out}" in result.stdout and re.search(r"job \d+ finished", result.stdout)
    return out


@pytest.mark.slow
def test_local_executor_runs_the_job(local_run):
    assert read_epochs(local_run) == list(range(EPOCHS))
    assert (local_run / "checkpoint-last.pth").is_file() and (local_run / f"checkpoint-{EPOCHS - 1}.pth").is_file()
    [task_log] = local_run.glob("submitit/*/*_0_log.out")
    assert "submitit job" in task_log.read_text()
    assert "executor" not in (local_run / "args.yaml").read_text()  # args.yaml stays a valid main_pretrain --config


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A one-node SLURM cluster for this module; skipped (with the reason) only if it cannot be installed or started."""
    folder = tmp_path_factory.mktemp("slurm_cluster")
    script = str(ROOT / "tests" / "slurm_cluster.sh")
    try:
        started = subprocess.run([script, "start", str(folder)], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        started = subprocess.CompletedProcess([], 1, "", "timed out")
    if started.returncode != 0:
        subprocess.run([script, "stop", str(folder)], capture_output=True)
        reason = f"no SLURM cluster: tests/slurm_cluster.sh start failed: {(started.stdout + started.stderr)[-1500:]}"
        warnings.warn(reason, stacklevel=1)  # shown in pytest's summary even without -rs
        pytest.skip(reason)
    try:
        with pytest.MonkeyPatch.context() as patch:
            # the jobs inherit this environment: the cluster's config, one thread (bit-identical to the local run)
            for name, value in {"SLURM_CONF": str(folder / "slurm.conf"), "OMP_NUM_THREADS": "1",
                                "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}.items():
                patch.setenv(name, value)
            yield folder
            subprocess.run(["scancel", "--user", "root"], capture_output=True)
    finally:
        subprocess.run([script, "stop", str(folder)], capture_output=True)


def submit(argv: list[str]) -> submitit.Job:
    return launch(main_pretrain.get_args_parser, main_pretrain.validate_args, main_pretrain.main, "mim_test", argv)


def job_info(job_id: str) -> dict[str, str]:
    line = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True).stdout
    return dict(item.split("=", 1) for item in line.split() if "=" in item)


def job_logs(job: submitit.Job) -> str:
    return "\n".join(path.read_text()[-3000:] for path in (job.paths.stdout, job.paths.stderr) if path.exists())


def wait_until(job: submitit.Job, done: Callable[[str], bool], what: str, timeout_s: float = 150) -> None:
    """Poll until done(state); the state is read once per round, so a job finishing between two reads is not a failure."""
    deadline = time.time() + timeout_s
    while True:
        state = job_info(job.job_id)["JobState"]
        if done(state):
            return
        assert state in {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED"}, \
            f"job {job.job_id} is {state} while waiting for {what}:\n{job_logs(job)}"
        assert time.time() < deadline, f"job {job.job_id} ({state}): no {what} after {timeout_s} s:\n{job_logs(job)}"
        time.sleep(0.2)


def wait_for_completion(job: submitit.Job) -> None:
    wait_until(job, lambda state: state == "COMPLETED", "completion")


@pytest.mark.slurm
def test_sbatch_requests_gpus_only_for_gpu_runs(slurm_cluster, tiny_imagefolder, tmp_path):
    parser = main_pretrain.get_args_parser()
    launcher_flags = add_launcher_args(parser)

    def sbatch_text(*flags: str) -> str:
        launcher, args = split_args(parser.parse_args(["--data_path", str(tiny_imagefolder), "--output_dir",
                                                       str(tmp_path), "--num_workers", "9", *flags]), launcher_flags)
        return make_executor(launcher, args, "x")._executor._make_submission_file_text("command", "0")

    gpu = sbatch_text("--nodes", "4", "--ngpus", "8", "--partition", "learn", "--account", "mim", "--qos", "high",
                      "--constraint", "volta32gb", "--comment", "deadline", "--exclude", "n[1-2]", "--mem_per_gpu", "40")
    for line in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=10", "--mem=320GB",
                 "--partition=learn", "--account=mim", "--qos=high", "--constraint=volta32gb", "--comment=deadline",
                 "--exclude='n[1-2]'", "--time=4320"):
        assert f"#SBATCH {line}\n" in gpu, line
    assert "srun --unbuffered" in gpu and "--kill-on-bad-exit=1" in gpu  # a dead task ends the step
    cpu = sbatch_text("--device", "cpu", "--ngpus", "2")
    assert "#SBATCH --ntasks-per-node=2\n" in cpu and "--gpus" not in cpu and "--mem" not in cpu and "--partition" not in cpu


@pytest.mark.slurm
@pytest.mark.slow
def test_two_task_job_trains_in_one_process_group(slurm_cluster, local_run, tiny_imagefolder, tmp_path):
    """--ngpus 2 --device cpu: 2 gloo processes x batch 4 train on what 1 process x batch 8 trains on."""
    job = submit(pretrain_flags(tiny_imagefolder, tmp_path, "--ngpus", "2", "--batch_size", "4"))
    wait_for_completion(job)
    assert read_epochs(tmp_path) == list(range(EPOCHS))
    assert (tmp_path / f"checkpoint-{EPOCHS - 1}.pth").is_file()
    rank0, rank1 = (Path(str(job.paths.stdout).replace("_0_log", f"_{task}_log")).read_text() for task in (0, 1))
    assert f"submitit job {job.job_id}: task 0 of 2" in rank0 and f"submitit job {job.job_id}: task 1 of 2" in rank1
    assert "effective batch: 8" in rank0 and "effective batch" not in rank1  # world size 2; rank 1 is silenced
    # gradients averaged over both ranks: the weights of one process on the whole batch (up to float error)
    ours, reference = final_weights(tmp_path), final_weights(local_run)
    assert ours.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(ours[key], value, atol=2e-5, rtol=0, msg=f"{key} differs")


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize("preemption", ["usr2", "scontrol_requeue"])
def test_a_job_preempted_inside_an_epoch_resumes_at_the_saved_step(preemption, slurm_cluster, local_run, tiny_imagefolder,
                                                                    tmp_path, monkeypatch):
    """The job pauses right after forward 6 (epoch 1, step index 1 of 4) and is signalled there: USR2 (what
    submitit's jobs get before their time limit), or `scontrol requeue` (SLURM's SIGTERM, as on pre-emption). Every
    task saves inside epoch 1 after step 2 and stops; the job is requeued (by the launcher, or by SLURM itself) and
    continues from that step: same log, same weights as the uninterrupted local run, bit for bit."""
    monkeypatch.setenv("PAUSE_AT", "6")
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}{os.pathsep}{ROOT / 'tests'}")  # the job unpickles fault_worker.paused_main
    from fault_worker import paused_main
    job = launch(main_pretrain.get_args_parser, main_pretrain.validate_args, paused_main, "mim_test",
                 pretrain_flags(tiny_imagefolder, tmp_path))
    wait_until(job, lambda state: (tmp_path / "paused").exists(), "the pause at step 1 of epoch 1")
    if preemption == "usr2":
        subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
    else:
        subprocess.run(["scontrol", "requeue", job.job_id], check=True)
    time.sleep(1)  # the signal reaches the task before it goes on
    (tmp_path / "go").touch()
    wait_for_completion(job)
    stdout = job.paths.stdout.read_text()
    assert job_info(job.job_id)["Restarts"] == "1", job_logs(job)
    # SLURM may truncate the job's stdout at the restart, so only the requeued run's lines are sure to be there
    assert "(inside epoch 1 after step 2)" in stdout, job_logs(job)
    assert read_epochs(tmp_path) == list(range(EPOCHS))
    assert [json.loads(line).get("resumed_at_step") for line in (tmp_path / "log.txt").read_text().splitlines()] == \
        [None, 2, None, None]
    ours, reference = final_weights(tmp_path), final_weights(local_run)
    assert ours.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(ours[key], value), f"{key} differs"


# ---------------------------------------------------------------- requests against sinfo, with a fake cluster

# what `sinfo -h -N -o "%P|%N|%c|%m|%G"` prints for a cluster of two 8-GPU nodes and two CPU nodes; the GPU
# nodes are also in a debug partition
SINFO = """gpu*|gpu01|96|512000|gpu:a100:8(S:0-1)
gpu*|gpu02|96|512000|gpu:a100:8(S:0-1)
cpu|cpu01|32|128000|(null)
cpu|cpu02|64|256000|(null)
debug|gpu01|96|512000|gpu:a100:8(S:0-1)
"""


def test_sinfo_lines_and_gres_are_read():
    nodes = parse_sinfo(SINFO + "garbage line\n")
    assert nodes[0] == Node(partition="gpu", default=True, name="gpu01", cpus=96, memory_mb=512000, gpus=8)
    assert nodes[3] == Node(partition="cpu", default=False, name="cpu02", cpus=64, memory_mb=256000, gpus=0)
    assert len(nodes) == 5
    assert [gpu_count(g) for g in ("gpu:8", "gpu:tesla:2(S:0,1)", "gpu:2,mps:200", "mps:100", "(null)", "gpu")] == [8, 2, 2, 0, 0, 1]


@pytest.mark.parametrize("request_, cpu_flag, message", [
    (Request("", 2, 8, 12, 8, 320), "--cpus_per_task", None),  # fits the default partition (gpu)
    (Request("cpu", 1, 1, 64, 0, 0), "--cpus_per_task", None),  # the larger CPU node
    (Request("cpu", 1, 1, 65, 0, 0), "--cpus_per_task",
     r"--cpus_per_task: the job asks for --cpus_per_task 65 x 1 task\(s\) per node = 65 CPUs, and the nodes of "
     r"partition 'cpu' have at most 64: use --cpus_per_task 64 or less"),
    (Request("cpu", 1, 4, 17, 0, 0), "--num_workers",
     r"--num_workers: the job asks for --num_workers 16 \+ 1 = 17 CPUs per task x 4 task\(s\) per node = 68 CPUs, .* "
     r"use --num_workers 15 or less"),
    (Request("cpu", 1, 1, 4, 1, 0), "--num_workers",
     r"the nodes of partition 'cpu' have no GPUs, and the job asks for 1 per node: add --device cpu \(CPU processes, "
     r"gloo, no GPU requested\), or a partition with GPUs \(--partition debug / gpu\)"),
    (Request("", 1, 16, 1, 16, 0), "--num_workers", r"--ngpus 16: the nodes of partition 'gpu' have at most 8 GPUs; use --ngpus 8 and more --nodes"),
    (Request("", 1, 8, 10, 8, 640), "--num_workers",
     r"--mem_per_gpu: the job asks for 640 GB per node .* at most 500 GB: use --mem_per_gpu 62 or less"),
    (Request("big", 1, 1, 1, 0, 0), "--num_workers", r"--partition big: no such partition; sinfo lists cpu, debug, gpu"),
    (Request("", 3, 8, 10, 8, 0), "--num_workers", r"--nodes 3: partition 'gpu' has 2 node\(s\)"),
])
def test_requests_are_compared_with_the_partitions_nodes(request_, cpu_flag, message):
    problem = check_request(request_, parse_sinfo(SINFO), cpu_flag)
    if message is None:
        assert problem is None
    else:
        assert problem is not None and re.fullmatch(message, problem), problem


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    """First on PATH: `sinfo` printing SINFO, an `sbatch` that refuses every job as a cluster without that gres
    would (and records that it ran), and an `srun` for submitit to find."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sinfo").write_text(f"#!/bin/sh\ncat <<'EOF'\n{SINFO}EOF\n")
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ntouch {tmp_path}/sbatch_ran\n"
                                   "echo 'sbatch: error: Invalid generic resource (gres) specification' >&2\nexit 1\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for tool in ("sinfo", "sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path


def fake_flags(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", "mae_vit_tiny_patch4", "--input_size", "32", "--data_path", str(data), "--output_dir", str(out), *extra]


@pytest.mark.parametrize("extra, flag", [
    (["--partition", "cpu", "--device", "cpu", "--cpus_per_task", "65"], "--cpus_per_task 65"),
    (["--partition", "cpu", "--device", "cpu", "--num_workers", "64"], "--num_workers 64 + 1 = 65 CPUs"),
    (["--partition", "cpu"], "add --device cpu"),
    (["--ngpus", "8", "--mem_per_gpu", "80"], "--mem_per_gpu"),
])
def test_unmeetable_request_fails_before_sbatch(fake_slurm, tiny_imagefolder, extra, flag, capsys):
    with pytest.raises(SystemExit, match=re.escape(flag)) as failure:
        submit(fake_flags(tiny_imagefolder, fake_slurm / "out", *extra))
    assert str(failure.value).startswith("error: the job can never start: ") and "nothing was submitted" in str(failure.value)
    assert not (fake_slurm / "sbatch_ran").exists()


def test_default_workers_fit_the_node_and_sbatch_refusal_is_one_line(fake_slurm, tiny_imagefolder, monkeypatch, capsys):
    """A one-process CPU job without --num_workers on partition cpu (nodes of 32 and 64 CPUs): the default (this machine's
    CPUs, here made 80) becomes 63, so 64 CPUs per task; sbatch then refuses, and that is one line naming sbatch's
    reason."""
    def parser_on_an_80_cpu_machine():
        parser = main_pretrain.get_args_parser()
        parser.set_defaults(num_workers=80)
        return parser

    seen = {}

    def fake_executor(launcher, args, name):
        seen["sbatch"] = make_executor(launcher, args, name)._executor._make_submission_file_text("command", "0")
        seen["num_workers"] = args.num_workers
        return make_executor(launcher, args, name)

    monkeypatch.setattr("util.submit.make_executor", fake_executor)
    with pytest.raises(SystemExit) as failure:
        launch(parser_on_an_80_cpu_machine, main_pretrain.validate_args, main_pretrain.main, "mim_test",
               fake_flags(tiny_imagefolder, fake_slurm / "out", "--partition", "cpu", "--device", "cpu", "--ngpus", "1"))
    assert seen["num_workers"] == 63 and "#SBATCH --cpus-per-task=64\n" in seen["sbatch"]
    assert str(failure.value) == "error: sbatch refused the job: sbatch: error: Invalid generic resource (gres) specification"
    captured = capsys.readouterr()
    assert "--num_workers 63: the default 80 would ask for 81 CPUs per task" in captured.out
    assert "Traceback" not in captured.err and "Invalid generic resource" not in captured.err
    assert (fake_slurm / "sbatch_ran").exists()


def test_an_explicit_num_workers_is_never_changed(fake_slurm, tiny_imagefolder):
    with pytest.raises(SystemExit, match=r"--num_workers 64 \+ 1 = 65 CPUs per task"):
        submit(fake_flags(tiny_imagefolder, fake_slurm / "out", "--partition", "cpu", "--device", "cpu", "--num_workers=64"))


# ---------------------------------------------------------------- requests against the real one-node cluster


def node_cpus() -> int:
    return int(subprocess.run(["sinfo", "-h", "-N", "-o", "%c"], capture_output=True, text=True, check=True).stdout.split()[0])


def queued_jobs() -> list[str]:
    return subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout.split()


@pytest.mark.slurm
def test_cluster_refuses_unmeetable_cpu_request_before_submission(slurm_cluster, tiny_imagefolder, tmp_path):
    cpus, before = node_cpus(), queued_jobs()
    with pytest.raises(SystemExit, match=rf"--cpus_per_task: .* have at most {cpus}: use --cpus_per_task {cpus} or less"):
        submit(pretrain_flags(tiny_imagefolder, tmp_path, "--cpus_per_task", str(cpus + 1)))
    with pytest.raises(SystemExit, match=rf"--num_workers: the job asks for --num_workers {cpus} \+ 1"):
        submit(pretrain_flags(tiny_imagefolder, tmp_path, "--num_workers", str(cpus)))
    assert queued_jobs() == before and not (tmp_path / "submitit").exists()


@pytest.mark.slurm
def test_cluster_refuses_gpu_request_on_gpu_less_partition(slurm_cluster, tiny_imagefolder, tmp_path):
    before = queued_jobs()
    with pytest.raises(SystemExit, match=r"the nodes of partition 'debug' have no GPUs, .*: add --device cpu"):
        submit(pretrain_flags(tiny_imagefolder, tmp_path, "--device", "cuda"))
    assert queued_jobs() == before and not (tmp_path / "submitit").exists()


@pytest.mark.slurm
@pytest.mark.slow
def test_cluster_runs_default_cpu_submission(slurm_cluster, tiny_imagefolder, tmp_path):
    """--device cpu and no --num_workers: the workers fit the node, so the job starts and completes."""
    flags = pretrain_flags(tiny_imagefolder, tmp_path, "--epochs", "1")
    at = flags.index("--num_workers")
    del flags[at:at + 2]
    job = submit(flags)
    wait_for_completion(job)
    assert read_epochs(tmp_path) == [0]
    assert int(job_info(job.job_id)["NumCPUs"]) <= node_cpus()


# The submitit commands of the official MAE's PRETRAIN.md and FINETUNE.md (facebookresearch/mae), verbatim but for
# the shell variables: (script's module, command's flags, effective batch that MAE's text gives for it).
OFFICIAL_MAE_COMMANDS = [
    (main_pretrain, "--job_dir JOB --nodes 8 --use_volta32 --batch_size 64 --model mae_vit_large_patch16 --norm_pix_loss "
                    "--mask_ratio 0.75 --epochs 800 --warmup_epochs 40 --blr 1.5e-4 --weight_decay 0.05 --data_path DATA", 4096),
    (main_finetune, "--job_dir JOB --nodes 4 --batch_size 32 --model vit_base_patch16 --finetune CKPT --epochs 100 --blr 5e-4 "
                    "--layer_decay 0.65 --weight_decay 0.05 --drop_path 0.1 --reprob 0.25 --mixup 0.8 --cutmix 1.0 "
                    "--dist_eval --data_path DATA", 1024),
    (main_finetune, "--job_dir JOB --nodes 4 --use_volta32 --batch_size 32 --model vit_large_patch16 --finetune CKPT "
                    "--epochs 50 --blr 1e-3 --layer_decay 0.75 --weight_decay 0.05 --drop_path 0.2 --reprob 0.25 "
                    "--mixup 0.8 --cutmix 1.0 --dist_eval --data_path DATA", 1024),
    (main_finetune, "--job_dir JOB --nodes 8 --use_volta32 --batch_size 16 --model vit_huge_patch14 --finetune CKPT "
                    "--epochs 50 --blr 1e-3 --layer_decay 0.75 --weight_decay 0.05 --drop_path 0.3 --reprob 0.25 "
                    "--mixup 0.8 --cutmix 1.0 --dist_eval --data_path DATA", 1024),
    (main_linprobe, "--job_dir JOB --nodes 4 --batch_size 512 --model vit_base_patch16 --cls_token --finetune CKPT "
                    "--epochs 90 --blr 0.1 --weight_decay 0.0 --dist_eval --data_path DATA", 16384),
]


@pytest.mark.parametrize("module,command,effective_batch", OFFICIAL_MAE_COMMANDS,
                         ids=["pretrain_vit_large", "finetune_vit_base", "finetune_vit_large", "finetune_vit_huge", "linprobe_vit_base"])
def test_the_official_mae_submitit_commands_parse_and_make_their_request(module, command, effective_batch, tmp_path):
    """Each command parses here and asks SLURM for what MAE's launcher asks: --nodes nodes of 8 GPUs (its --ngpus
    default), 8 tasks per node, 32 GB V100s for --use_volta32, 4320 minutes; the effective batch is MAE's."""
    parser = module.get_args_parser()
    launcher_flags = add_launcher_args(parser)
    argv = command.replace("JOB", str(tmp_path / "job")).replace("DATA", str(tmp_path)).replace("CKPT", "x.pth").split()
    launcher, args = split_args(parser.parse_args(argv), launcher_flags)
    script = make_executor(launcher, args, "x")._executor._make_submission_file_text("command", "0")
    nodes = int(command.split("--nodes ")[1].split()[0])
    for line in (f"--nodes={nodes}", "--ntasks-per-node=8", "--gpus-per-node=8", "--time=4320"):
        assert f"#SBATCH {line}\n" in script, line
    assert ("#SBATCH --constraint=volta32gb\n" in script) == ("--use_volta32" in command)
    assert plan_batch(args.effective_batch, launcher.nodes * launcher.ngpus, args.batch_size, args.accum_iter).effective == effective_batch


def test_without_slurm_the_launcher_says_so_in_one_line(tiny_imagefolder, tmp_path, monkeypatch):
    """No sbatch and srun on PATH (a workstation): one line naming them and --executor local, not submitit's traceback."""
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder
    with pytest.raises(SystemExit, match=r"^error: --executor slurm needs SLURM's sbatch and srun, not found on PATH; "
                                         r"on a machine without SLURM use --executor local"):
        launch(main_pretrain.get_args_parser, main_pretrain.validate_args, main_pretrain.main, "mim_test",
               ["--data_path", str(tiny_imagefolder), "--output_dir", str(tmp_path / "out"), "--device", "cpu"])
