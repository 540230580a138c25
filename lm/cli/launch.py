"""`lm launch {local,tpu,slurm} [options] -- <lm command>`: run an lm command as a
multi-process pod (processes here, a Cloud TPU slice, a SLURM job)."""

from __future__ import annotations

from lm.cli.command import Command


def local_arguments(q) -> None:
    q.add_argument("--processes", type=int, required=True)
    q.add_argument("--devices-per-process", type=int, default=1)
    q.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")


def tpu_arguments(q) -> None:
    q.add_argument("--name", required=True, help="queued resource and node id")
    q.add_argument("--zone", required=True)
    q.add_argument("--accelerator", required=True, help="accelerator type, e.g. v5p-64")
    q.add_argument("--spot", action="store_true")
    q.add_argument("--project", default="")
    q.add_argument("--runtime-version", default="", help="default: by accelerator generation")
    q.add_argument("--fetch", default="runs",
                   help="path under the repo copied back from worker 0 ('' = none)")
    q.add_argument("--poll-seconds", type=float, default=30.0)
    q.add_argument("--dry-run", action="store_true", help="print the gcloud commands only")


def slurm_arguments(q) -> None:
    q.add_argument("--nodes", type=int, required=True)
    q.add_argument("--gpus-per-node", type=int, required=True)
    q.add_argument("--partition", default="")
    q.add_argument("--time", default="", help="e.g. 04:00:00")
    q.add_argument("--job-name", default="lm")
    q.add_argument("--per", choices=("gpu", "node"), default="gpu",
                   help="one process per GPU (default) or per node")
    q.add_argument("--dry-run", action="store_true", help="print the sbatch script only")


def remote_command(args) -> list[str]:
    """The lm command after `--` (a leading `lm` tolerated), or a one-line error."""
    from lm.errors import ConfigError
    if args.remote is None:
        raise ConfigError(f"lm launch {args.launch_command}: put the lm command after --, "
                          f"e.g. lm launch {args.launch_command} ... -- train --config C")
    if not args.remote:
        raise ConfigError(f"lm launch {args.launch_command}: no command after --")
    if args.remote[0] in ("lm", "lm.cli"):  # tolerate `-- lm train ...`
        return args.remote[1:]
    return args.remote


def local(args) -> int:
    from lm.launch.local import run_local
    return run_local(args.processes, args.devices_per_process, remote_command(args),
                     port=args.port)


def tpu(args) -> int:
    from lm.launch.tpu import launch
    return launch(args.name, args.zone, args.accelerator, remote_command(args), spot=args.spot,
                  project=args.project, runtime_version=args.runtime_version,
                  fetch=args.fetch, dry_run=args.dry_run, poll_s=args.poll_seconds)


def slurm(args) -> int:
    from lm.errors import ConfigError
    from lm.launch.slurm import launch
    remote = remote_command(args)
    if not args.job_name or "/" in args.job_name:
        raise ConfigError(f"--job-name {args.job_name!r} must be a non-empty name without '/'")
    return launch(args.nodes, args.gpus_per_node, remote, partition=args.partition,
                  time=args.time, job_name=args.job_name, per=args.per, dry_run=args.dry_run)


COMMANDS = [Command(
    "launch", "run an lm command as a multi-process pod",
    description="lm launch {local,tpu,slurm} [options] -- <lm command>",
    one_line_usage=True, remote=True, launcher=True, subcommands=[
        Command("local", "P processes on this machine, D CPU devices each", local_arguments, local),
        Command("tpu", "a Cloud TPU slice via a queued resource (gcloud)", tpu_arguments, tpu),
        Command("slurm", "an sbatch job; srun starts the processes", slurm_arguments, slurm),
    ])]
