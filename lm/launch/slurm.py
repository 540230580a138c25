"""`lm launch slurm`: an sbatch job that runs one `lm` command as a pod.

The script's body is `srun <python> -m lm.cli <command>`: srun starts one task per GPU
(default; `--ntasks-per-node=G`, each task drives one GPU) or one per node (`--per node`,
each task drives all G GPUs of its node), and every task joins the pod through JAX's
SLURM detection (lm/parallel/distributed.py). `--kill-on-bad-exit=1` stops the whole step
when one task fails. The script is saved as ./slurm/<job-name>.sbatch and submitted
with `sbatch`; `--dry-run` prints it instead.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from lm.config import ConfigError


def sbatch_script(nodes: int, gpus_per_node: int, command: list[str], *, partition: str = "",
                  time: str = "", job_name: str = "lm", per: str = "gpu",
                  workdir: str | None = None, python: str | None = None) -> str:
    if nodes < 1:
        raise ConfigError(f"--nodes must be >= 1, got {nodes}")
    if gpus_per_node < 0:
        raise ConfigError(f"--gpus-per-node must be >= 0, got {gpus_per_node}")
    if per not in ("gpu", "node"):
        raise ConfigError(f"--per must be 'gpu' or 'node', got {per!r}")
    if not command:
        raise ConfigError("lm launch slurm: no command after --")
    workdir = workdir or os.getcwd()
    python = python or sys.executable
    tasks_per_node = gpus_per_node if per == "gpu" and gpus_per_node > 0 else 1
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name={job_name}",
             f"#SBATCH --nodes={nodes}",
             f"#SBATCH --ntasks-per-node={tasks_per_node}"]
    if gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={gpus_per_node}")
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if time:
        lines.append(f"#SBATCH --time={time}")
    lines += [f"#SBATCH --output={workdir}/slurm/%x-%j.out",
              "",
              f"# {nodes} node(s) x {tasks_per_node} process(es); written by lm launch slurm",
              "set -euo pipefail",
              f"cd {shlex.quote(workdir)}"]
    if per == "node" and gpus_per_node > 1:  # one process drives all of its node's GPUs
        lines.append("export LMLAB_LOCAL_DEVICES=" + ",".join(map(str, range(gpus_per_node))))
    lines.append(f"srun --kill-on-bad-exit=1 {shlex.join([python, '-m', 'lm.cli', *command])}")
    return "\n".join(lines) + "\n"


def launch(nodes: int, gpus_per_node: int, command: list[str], *, partition="", time="",
           job_name="lm", per="gpu", dry_run=False) -> int:
    script = sbatch_script(nodes, gpus_per_node, command, partition=partition, time=time,
                           job_name=job_name, per=per)
    if dry_run:
        sys.stdout.write(script)
        return 0
    if shutil.which("sbatch") is None:
        raise ConfigError("lm launch slurm: sbatch not found on PATH (run this on a "
                          "SLURM login node, or use --dry-run)")
    path = Path("slurm") / f"{job_name}.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    print(f"wrote {path}", flush=True)
    return subprocess.run(["sbatch", str(path)]).returncode
