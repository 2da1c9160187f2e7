"""Run a main script as a submitit job: on a SLURM cluster (`--executor slurm`) or on this machine (`--executor local`).

`submitit_pretrain.py`, `submitit_finetune.py` and `submitit_linprobe.py` call `launch` with their main script's
parser, validation and `main`: the main script's flags plus the launcher flags added here, one source of both.
Every task of the job runs `Trainer`, which turns submitit's job environment into torchrun's variables, so
`util.dist.init_distributed` sets the process group up exactly as under torchrun. On pre-emption or timeout
submitit calls `Trainer.checkpoint`, requeues the job, and the requeued job resumes from
`output_dir/checkpoint-last.pth` (the main scripts' auto-resume).

Before `sbatch`, when `sinfo` answers, the request is compared with what the partition's nodes have (CPUs per
task, GPUs and memory per node, the partition itself): one that no node can ever meet fails at once, naming the
flag to change, instead of waiting in the queue forever. Where neither `--num_workers` nor `--cpus_per_task` is
given, the data-loading workers are fitted to the node (the default counts this machine's CPUs, not the node's).
An sbatch refusal is one line naming sbatch's reason.
"""
import argparse
import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import submitit
from submitit.core.utils import FailedJobError

from util.batch import plan_batch
from util.checkpoint import LAST
from util.config import load_config, parse_with_config
from util.dry_run import GpuType, drop_dry_run_args, gpu_types
from util.preempt import Preempted

ROOT = Path(__file__).resolve().parent.parent
# a long run outlives many partition time limits: each timeout requeues the job (pre-emptions do not count)
MAX_TIMEOUT_REQUEUES = 100
SLURM_ONLY_FLAGS = ("partition", "account", "qos", "constraint", "comment", "exclude")
# one line per node and partition: partition (default marked *), node, CPUs, memory (MB), generic resources
SINFO_FORMAT = "%P|%N|%c|%m|%G"


def add_launcher_args(parser: argparse.ArgumentParser) -> list[str]:
    """Add the launcher's flags to a main script's parser; returns their names (kept out of the run's args)."""
    group = parser.add_argument_group("launcher (submitit)")
    group.add_argument("--executor", default="slurm", choices=["slurm", "local"],
                       help="slurm: submit with sbatch and return; local: run the job's tasks on this machine and wait for them")
    group.add_argument("--nodes", default=1, type=int, help="nodes to request")
    group.add_argument("--ngpus", default=8, type=int,
                       help="processes per node, one per GPU (8, as the official MAE launcher: --nodes 8 alone is 64 GPUs); "
                            "with --device cpu, CPU processes (gloo) and no GPU is requested")
    group.add_argument("--timeout", default=4320, type=int, help="time limit in minutes; shortly before it the job is signalled and requeued")
    group.add_argument("--job_dir", default="", help="submitit's folder (job pickles, stdout/stderr per job id); default output_dir/submitit; must be visible from every node")
    group.add_argument("--partition", default="", help="SLURM partition (default: the cluster's default)")
    group.add_argument("--account", default="", help="SLURM account to charge")
    group.add_argument("--qos", default="", help="SLURM quality of service")
    group.add_argument("--constraint", default="", help="SLURM node features required, e.g. volta32gb")
    group.add_argument("--use_volta32", action="store_true",
                       help="32 GB V100 nodes: adds the node feature volta32gb to --constraint (the official MAE launcher's flag)")
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
        requeue = signal.getsignal(signal.SIGUSR2)  # submitit's: Trainer.checkpoint, then requeue, on rank 0
        try:
            # main() fills in derived flags (e.g. lr); give it a copy so a requeue starts from the submitted flags
            self.main(argparse.Namespace(**vars(self.args)))  # returns nothing: submitit would pickle a model
        except Preempted as stop:  # every rank saved at the same step inside the epoch (util.preempt)
            print(f"[rank {env.global_rank}] {stop}", flush=True)
            if stop.signum == signal.SIGUSR2 and env.global_rank == 0 and callable(requeue):
                requeue(signal.SIGUSR2, None)  # the time limit's signal: requeue, as submitit would have (exits)
            # SIGTERM: SLURM itself requeues (pre-emption, scontrol requeue) or ends the job

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on pre-emption or timeout (rank 0); the job is requeued with what this returns."""
        resume_from_last(self.args)
        return submitit.helpers.DelayedSubmission(Trainer(self.main, self.args))


@dataclass(frozen=True)
class Node:
    """One node of one partition, as sinfo reports it."""

    partition: str
    default: bool  # the cluster's default partition
    name: str
    cpus: int
    memory_mb: int
    gpus: int


@dataclass(frozen=True)
class Request:
    """What the job asks of each node."""

    partition: str  # "" for the cluster's default
    nodes: int
    tasks_per_node: int
    cpus_per_task: int
    gpus_per_node: int
    mem_gb: int  # per node; 0: the cluster's default


def gpu_count(gres: str) -> int:
    """GPUs in sinfo's %G: "gpu:8", "gpu:a100:4(S:0-1)", "gpu:2,mps:200", "(null)"."""
    total = 0
    for entry in re.sub(r"\([^)]*\)", "", gres).split(","):
        fields = entry.strip().split(":")
        if fields[0] == "gpu":
            total += int(fields[-1]) if len(fields) > 1 and fields[-1].isdigit() else 1
    return total


def parse_sinfo(text: str) -> list[Node]:
    """Nodes from `sinfo -h -N -o SINFO_FORMAT`; lines that do not parse are skipped."""
    nodes = []
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 5:
            continue
        partition, name, cpus, memory, gres = fields
        try:
            nodes.append(Node(partition=partition.rstrip("*"), default=partition.endswith("*"), name=name,
                              cpus=int(cpus.rstrip("+")), memory_mb=int(memory.rstrip("+")), gpus=gpu_count(gres)))
        except ValueError:
            continue
    return nodes


def query_nodes() -> Optional[list[Node]]:
    """The cluster's nodes from sinfo, or None where sinfo is missing, fails or says nothing."""
    try:
        result = subprocess.run(["sinfo", "-h", "-N", "-o", SINFO_FORMAT], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (parse_sinfo(result.stdout) or None) if result.returncode == 0 else None


def cpus_per_task(launcher: argparse.Namespace, args: argparse.Namespace) -> int:
    return launcher.cpus_per_task or args.num_workers + 1


def request_of(launcher: argparse.Namespace, args: argparse.Namespace) -> Request:
    return Request(partition=launcher.partition, nodes=launcher.nodes, tasks_per_node=launcher.ngpus,
                   cpus_per_task=cpus_per_task(launcher, args),
                   gpus_per_node=launcher.ngpus if args.device.startswith("cuda") else 0,
                   mem_gb=launcher.mem_per_gpu * launcher.ngpus)


def partition_nodes(request: Request, nodes: list[Node]) -> tuple[str, list[Node]]:
    """(partition name, its nodes) of the request: --partition or the default; a partition sinfo does not list
    is an error naming --partition. ("", []) when no partition is given and none is the default."""
    partitions = sorted({node.partition for node in nodes})
    name = request.partition or next((node.partition for node in nodes if node.default), "")
    if request.partition and request.partition not in partitions:
        raise ValueError(f"--partition {request.partition}: no such partition; sinfo lists {', '.join(partitions)}")
    return name, [node for node in nodes if node.partition == name]


def check_request(request: Request, nodes: list[Node], cpu_flag: str) -> Optional[str]:
    """Why no node of the partition can ever run the job, naming the flag to change; None if some can.

    `cpu_flag` names what set the CPUs per task: "--cpus_per_task", or "--num_workers" (CPUs = workers + 1)."""
    try:
        partition, members = partition_nodes(request, nodes)
    except ValueError as err:
        return str(err)
    if not members:
        return None  # no default partition: sbatch itself will say so
    where = f"the nodes of partition '{partition}'"
    if request.nodes > len(members):
        return f"--nodes {request.nodes}: partition '{partition}' has {len(members)} node(s)"
    most_gpus = max(node.gpus for node in members)
    if request.gpus_per_node > most_gpus:
        if most_gpus == 0:
            with_gpus = sorted({node.partition for node in nodes if node.gpus})
            elsewhere = f", or a partition with GPUs (--partition {' / '.join(with_gpus)})" if with_gpus else ""
            return (f"{where} have no GPUs, and the job asks for {request.gpus_per_node} per node: add --device cpu "
                    f"(CPU processes, gloo, no GPU requested){elsewhere}")
        return f"--ngpus {request.gpus_per_node}: {where} have at most {most_gpus} GPUs; use --ngpus {most_gpus} and more --nodes"
    most_cpus = max(node.cpus for node in members if node.gpus >= request.gpus_per_node)
    wanted = request.tasks_per_node * request.cpus_per_task
    if wanted > most_cpus:
        if request.tasks_per_node > most_cpus:
            return (f"--ngpus {request.tasks_per_node}: {request.tasks_per_node} processes per node need at least as "
                    f"many CPUs, and {where} have at most {most_cpus}")
        fits = most_cpus // request.tasks_per_node
        detail = (f"--num_workers {request.cpus_per_task - 1} + 1 = {request.cpus_per_task} CPUs per task"
                  if cpu_flag == "--num_workers" else f"--cpus_per_task {request.cpus_per_task}")
        advice = f"--num_workers {fits - 1} or less" if cpu_flag == "--num_workers" else f"--cpus_per_task {fits} or less"
        return (f"{cpu_flag}: the job asks for {detail} x {request.tasks_per_node} task(s) per node = {wanted} CPUs, "
                f"and {where} have at most {most_cpus}: use {advice}")
    most_memory_mb = max(node.memory_mb for node in members)
    if request.mem_gb * 1024 > most_memory_mb:
        return (f"--mem_per_gpu: the job asks for {request.mem_gb} GB per node (--mem_per_gpu x --ngpus), and {where} "
                f"have at most {most_memory_mb // 1024} GB: use --mem_per_gpu {most_memory_mb // 1024 // request.tasks_per_node} or less")
    return None


def flag_given(flag: str, argv: Sequence[str], config: dict) -> bool:
    """Whether the user set --flag: on the command line (--flag V or --flag=V) or in the --config file."""
    option = f"--{flag}"
    return flag in config or any(token == option or token.startswith(option + "=") for token in argv)


def fit_default_workers(launcher: argparse.Namespace, args: argparse.Namespace, nodes: list[Node]) -> None:
    """Lower the default --num_workers (this machine's CPUs) so that workers + 1 CPUs per task fit the node."""
    try:
        partition, members = partition_nodes(request_of(launcher, args), nodes)
    except ValueError:
        return  # check_request names the partition
    gpus = request_of(launcher, args).gpus_per_node
    fitting = [node.cpus for node in members if node.gpus >= gpus]
    if not fitting:
        return
    workers = max(0, max(fitting) // launcher.ngpus - 1)
    if workers < args.num_workers:
        print(f"--num_workers {workers}: the default {args.num_workers} would ask for {args.num_workers + 1} CPUs per "
              f"task, and the nodes of partition '{partition}' have {max(fitting)} CPUs for {launcher.ngpus} task(s)", flush=True)
        args.num_workers = workers


def check_against_cluster(launcher: argparse.Namespace, args: argparse.Namespace, given: Callable[[str], bool]) -> None:
    """Fit the default workers and refuse an unmeetable request, both from sinfo; nothing when sinfo cannot answer.

    `given(flag)` says whether the user set that flag (command line or --config)."""
    nodes = query_nodes()
    if nodes is None:
        return
    if not given("num_workers") and not given("cpus_per_task"):
        fit_default_workers(launcher, args, nodes)
    cpu_flag = "--cpus_per_task" if launcher.cpus_per_task else "--num_workers"
    problem = check_request(request_of(launcher, args), nodes, cpu_flag)
    if problem is not None:
        raise SystemExit(f"error: the job can never start: {problem} (from sinfo; nothing was submitted)")


def submit_job(executor: submitit.AutoExecutor, trainer: "Trainer") -> submitit.Job:
    """executor.submit, with a refusal by sbatch (or no sbatch at all) as one line instead of a traceback."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):  # submitit prints sbatch's stderr before raising it again
            return executor.submit(trainer)
    except FailedJobError as err:
        reason = next((line.strip() for line in reversed(str(err).splitlines()) if line.strip()), "no reason given")
        raise SystemExit(f"error: sbatch refused the job: {reason}") from None
    except FileNotFoundError as err:
        raise SystemExit(f"error: cannot submit: {err.filename or 'sbatch'} not found; on a machine without SLURM use "
                         f"--executor local") from None


def make_executor(launcher: argparse.Namespace, args: argparse.Namespace, name: str) -> submitit.AutoExecutor:
    folder = Path(launcher.job_dir or Path(args.output_dir) / "submitit").resolve() / "%j"
    executor = submitit.AutoExecutor(folder=folder, cluster=launcher.executor,
                                     slurm_max_num_timeout=MAX_TIMEOUT_REQUEUES, local_max_num_timeout=MAX_TIMEOUT_REQUEUES)
    slurm_only = {f"slurm_{key}": getattr(launcher, key) for key in SLURM_ONLY_FLAGS if getattr(launcher, key)}
    if launcher.use_volta32:  # the official launcher's request, joined to any other feature asked for
        slurm_only["slurm_constraint"] = "&".join(filter(None, [launcher.constraint, "volta32gb"]))
    executor.update_parameters(
        name=name, timeout_min=launcher.timeout, nodes=launcher.nodes, tasks_per_node=launcher.ngpus,
        # CPU jobs request no GPU at all: a gres request fails on clusters (or partitions) without GPUs
        gpus_per_node=launcher.ngpus if args.device.startswith("cuda") else None,
        cpus_per_task=cpus_per_task(launcher, args),
        mem_gb=launcher.mem_per_gpu * launcher.ngpus or None,
        # one task that exits non-zero ends the job step: its peers stop instead of waiting out --dist_timeout
        # (util.dist.stop_together already ends them within seconds when the failing task can say why)
        slurm_srun_args=["--kill-on-bad-exit=1"],
        **slurm_only,
    )
    return executor


def job_script(executor: submitit.AutoExecutor) -> str:
    """The sbatch script that submitting through `executor` would write (submitit's own text)."""
    slurm = executor._executor  # submitit has no public call for the text; this is what its submit() writes
    return slurm._make_submission_file_text(slurm._submitit_command_str, "dry_run")


def requested_gpu(launcher: argparse.Namespace, args: argparse.Namespace) -> str:
    """The GPU type a dry run prices: --dry_run_gpu, else V100 where the job asks for volta32gb nodes."""
    if args.dry_run_gpu:
        return args.dry_run_gpu
    return "V100" if launcher.use_volta32 or "volta" in launcher.constraint.lower() else ""


def launch(get_args_parser: Callable[[], argparse.ArgumentParser],
           validate: Callable[[argparse.Namespace, argparse.ArgumentParser], None],
           main: Callable[[argparse.Namespace], object], name: str, argv: list[str] | None = None, *,
           dry_run: Optional[Callable[[argparse.Namespace, int, list[GpuType]], str]] = None,
           whole_batch: Callable[[argparse.Namespace], Optional[str]] = lambda args: None) -> Optional[submitit.Job]:
    """Parse the main script's flags plus the launcher's, submit the job, print where it writes; returns the job.

    `dry_run(args, world_size, gpu_types)` is the main script's `--dry_run` report, printed with the job script
    instead of submitting (None is returned); `whole_batch(args)` says why the method needs accum_iter 1
    (util.batch). A world size that cannot make --effective_batch is refused before submitting."""
    parser = get_args_parser()
    launcher_flags = add_launcher_args(parser)
    launcher, args = split_args(parse_with_config(parser, argv), launcher_flags)
    validate(args, parser)
    if launcher.nodes < 1 or launcher.ngpus < 1:
        parser.error("--nodes and --ngpus must be positive")
    if launcher.executor == "local" and launcher.nodes > 1:
        parser.error("--executor local runs on this machine only: use --nodes 1")
    if args.world_size:
        parser.error(f"--world_size {args.world_size}: a job's world size is --nodes x --ngpus")
    world_size = launcher.nodes * launcher.ngpus
    try:
        plan_batch(args.effective_batch, world_size, args.batch_size, args.accum_iter, whole_batch(args))
    except ValueError as err:
        nodes = [n for n in range(1, 4 * launcher.nodes + 9)
                 if args.effective_batch and args.effective_batch % (n * launcher.ngpus) == 0]
        nearest = sorted(nodes, key=lambda n: abs(n - launcher.nodes))[:2]
        hint = f"; with --ngpus {launcher.ngpus}: --nodes {' or '.join(map(str, sorted(nearest)))}" if nearest else ""
        parser.error(f"{err} (--nodes {launcher.nodes} x --ngpus {launcher.ngpus} = {world_size} processes{hint}; "
                     f"nothing was submitted)")
    args.output_dir = str(Path(args.output_dir).resolve())
    # the job unpickles the main script's function: make the repository importable wherever it starts
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    is_dry_run, gpus = args.dry_run, gpu_types(requested_gpu(launcher, args)) if args.dry_run else []
    drop_dry_run_args(args)  # the job's args.yaml records the run's flags only

    if launcher.executor == "slurm":
        if (missing := [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]) and not is_dry_run:
            raise SystemExit(f"error: --executor slurm needs SLURM's {' and '.join(missing)}, not found on PATH; on a "
                             f"machine without SLURM use --executor local (the same job on this machine)")
        argv_seen = list(sys.argv[1:] if argv is None else argv)
        config = load_config(args.config, parser) if args.config else {}
        check_against_cluster(launcher, args, lambda flag: flag_given(flag, argv_seen, config))
    if is_dry_run:
        if dry_run is None:
            parser.error("--dry_run: this launcher has no report")
        print(dry_run(args, world_size, gpus))
        print(f"  job              {launcher.nodes} node(s) x {launcher.ngpus} task(s), one per GPU; output_dir "
              f"{args.output_dir}; nothing was submitted")
        if launcher.executor == "slurm":
            print("job script (sbatch):\n" + job_script(make_executor(launcher, args, name)))
        return None
    executor = make_executor(launcher, args, name)
    job = submit_job(executor, Trainer(main, args)) if launcher.executor == "slurm" else executor.submit(Trainer(main, args))
    print(f"submitted job {job.job_id} ({launcher.executor}: {launcher.nodes} node(s) x {launcher.ngpus} process(es))\n"
          f"  stdout: {job.paths.stdout}\n  stderr: {job.paths.stderr}\n  output_dir: {args.output_dir}", flush=True)
    if launcher.executor == "local":
        job.result()  # waits; raises with the job's traceback if a task failed
        print(f"job {job.job_id} finished", flush=True)
    return job

