"""Run a main script as a submitit job: on a SLURM cluster (`--executor slurm`) or on this machine (`--executor local`).

`submitit_pretrain.py`, `submitit_finetune.py` and `submitit_linprobe.py` call `launch` with their main script's
parser, validation and `main`: the main script's flags plus the launcher flags added here, one source of both.
Every task of the job runs `Trainer`, which turns submitit's job environment into torchrun's variables, so
`util.dist.init_distributed` sets the process group up exactly as under torchrun. On pre-emption or timeout
submitit calls `Trainer.checkpoint`, requeues the job, and the requeued job resumes from
`output_dir/checkpoint-last.pth` (the main scripts' auto-resume).
"""
import argparse
import os
from pathlib import Path
from typing import Callable

import submitit

from util.checkpoint import LAST
from util.config import parse_with_config

ROOT = Path(__file__).resolve().parent.parent
# a long run outlives many partition time limits: each timeout requeues the job (pre-emptions do not count)
MAX_TIMEOUT_REQUEUES = 100
SLURM_ONLY_FLAGS = ("partition", "account", "qos", "constraint", "comment", "exclude")


def add_launcher_args(parser: argparse.ArgumentParser) -> list[str]:
    """Add the launcher's flags to a main script's parser; returns their names (kept out of the run's args)."""
    group = parser.add_argument_group("launcher (submitit)")
    group.add_argument("--executor", default="slurm", choices=["slurm", "local"],
                       help="slurm: submit with sbatch and return; local: run the job's tasks on this machine and wait for them")
    group.add_argument("--nodes", default=1, type=int, help="nodes to request")
    group.add_argument("--ngpus", default=1, type=int,
                       help="processes per node, one per GPU; with --device cpu, CPU processes (gloo) and no GPU is requested")
    group.add_argument("--timeout", default=4320, type=int, help="time limit in minutes; shortly before it the job is signalled and requeued")
    group.add_argument("--job_dir", default="", help="submitit's folder (job pickles, stdout/stderr per job id); default output_dir/submitit; must be visible from every node")
    group.add_argument("--partition", default="", help="SLURM partition (default: the cluster's default)")
    group.add_argument("--account", default="", help="SLURM account to charge")
    group.add_argument("--qos", default="", help="SLURM quality of service")
    group.add_argument("--constraint", default="", help="SLURM node features required, e.g. volta32gb")
    group.add_argument("--comment", default="", help="SLURM job comment")
    group.add_argument("--exclude", default="", help="SLURM nodes not to run on, e.g. node[01-03]")
    group.add_argument("--mem_per_gpu", default=0, type=int,
                       help="GB of host memory per process (per GPU), requested per node as this x --ngpus; 0: the cluster's default")
    group.add_argument("--cpus_per_task", default=0, type=int,
                       help="CPUs per process; 0: --num_workers + 1 (the data-loading workers and the training process)")
    return [action.dest for action in group._group_actions]


def split_args(args: argparse.Namespace, launcher_flags: list[str]) -> tuple[argparse.Namespace, argparse.Namespace]:
    """(launcher args, run args): the run's args.yaml and checkpoints hold the main script's flags only."""
    values = vars(args)
    launcher = argparse.Namespace(**{k: v for k, v in values.items() if k in launcher_flags})
    run = argparse.Namespace(**{k: v for k, v in values.items() if k not in launcher_flags})
    return launcher, run


def port_for_job(job_id: str) -> int:
    """A rendezvous port every task of a job derives alike, different for jobs sharing a node; below Linux's
    ephemeral range (32768+), where outgoing connections take their ports."""
    return 20000 + int(job_id) % 10000


def torchrun_env(env: submitit.JobEnvironment) -> dict[str, str]:
    """torchrun's variables for this task: ranks from submitit, the master is the job's first node."""
    return {"MASTER_ADDR": env.hostnames[0], "MASTER_PORT": str(port_for_job(env.raw_job_id)),
            "RANK": str(env.global_rank), "WORLD_SIZE": str(env.num_tasks), "LOCAL_RANK": str(env.local_rank)}


def resume_from_last(args: argparse.Namespace) -> None:
    """A requeued job continues from its own last checkpoint, not from the `--resume` it was started with."""
    if (Path(args.output_dir) / LAST).is_file():
        args.resume = ""
        args.auto_resume = True


class Trainer:
    """What every task of the job runs: rendezvous variables, then the main script's `main(args)`."""

    def __init__(self, main: Callable[[argparse.Namespace], object], args: argparse.Namespace) -> None:
        self.main = main
        self.args = args

    def __call__(self) -> None:
        env = submitit.JobEnvironment()
        os.environ.update(torchrun_env(env))
        print(f"submitit job {env.job_id}: task {env.global_rank} of {env.num_tasks} on {env.hostname}, "
              f"output_dir {self.args.output_dir}", flush=True)
        # requeued by SLURM itself (pre-emption, scontrol requeue, node failure): the submitted pickle runs again
        if int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0:
            resume_from_last(self.args)
        # main() fills in derived flags (e.g. lr); give it a copy so a requeue starts from the submitted flags
        self.main(argparse.Namespace(**vars(self.args)))  # returns nothing: submitit would pickle a model

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on pre-emption or timeout (rank 0); the job is requeued with what this returns."""
        resume_from_last(self.args)
        return submitit.helpers.DelayedSubmission(Trainer(self.main, self.args))


def make_executor(launcher: argparse.Namespace, args: argparse.Namespace, name: str) -> submitit.AutoExecutor:
    folder = Path(launcher.job_dir or Path(args.output_dir) / "submitit").resolve() / "%j"
    executor = submitit.AutoExecutor(folder=folder, cluster=launcher.executor,
                                     slurm_max_num_timeout=MAX_TIMEOUT_REQUEUES, local_max_num_timeout=MAX_TIMEOUT_REQUEUES)
    slurm_only = {f"slurm_{key}": getattr(launcher, key) for key in SLURM_ONLY_FLAGS if getattr(launcher, key)}
    executor.update_parameters(
        name=name, timeout_min=launcher.timeout, nodes=launcher.nodes, tasks_per_node=launcher.ngpus,
        # CPU jobs request no GPU at all: a gres request fails on clusters (or partitions) without GPUs
        gpus_per_node=launcher.ngpus if args.device.startswith("cuda") else None,
        cpus_per_task=launcher.cpus_per_task or args.num_workers + 1,
        mem_gb=launcher.mem_per_gpu * launcher.ngpus or None,
        **slurm_only,
    )
    return executor


def launch(get_args_parser: Callable[[], argparse.ArgumentParser],
           validate: Callable[[argparse.Namespace, argparse.ArgumentParser], None],
           main: Callable[[argparse.Namespace], object], name: str, argv: list[str] | None = None) -> submitit.Job:
    """Parse the main script's flags plus the launcher's, submit the job, print where it writes; returns the job."""
    parser = get_args_parser()
    launcher_flags = add_launcher_args(parser)
    launcher, args = split_args(parse_with_config(parser, argv), launcher_flags)
    validate(args, parser)
    if launcher.nodes < 1 or launcher.ngpus < 1:
        parser.error("--nodes and --ngpus must be positive")
    if launcher.executor == "local" and launcher.nodes > 1:
        parser.error("--executor local runs on this machine only: use --nodes 1")
    args.output_dir = str(Path(args.output_dir).resolve())
    # the job unpickles the main script's function: make the repository importable wherever it starts
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

    job = make_executor(launcher, args, name).submit(Trainer(main, args))
    print(f"submitted job {job.job_id} ({launcher.executor}: {launcher.nodes} node(s) x {launcher.ngpus} process(es))\n"
          f"  stdout: {job.paths.stdout}\n  stderr: {job.paths.stderr}\n  output_dir: {args.output_dir}", flush=True)
    if launcher.executor == "local":
        job.result()  # waits; raises with the job's traceback if a task failed
        print(f"job {job.job_id} finished", flush=True)
    return job

