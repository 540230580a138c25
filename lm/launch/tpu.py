"""`lm launch tpu`: run one `lm` command on every worker of a Cloud TPU slice.

Steps (each a gcloud command; `--dry-run` prints them, one per line, in order):
create a queued resource, poll it until ACTIVE, copy the working tree (a tarball of the
git-tracked and untracked-but-not-ignored files) to every worker, install it
(`pip install -e '.[tpu]'`), run the command on all workers at once with
LMLAB_DISTRIBUTED=auto (each joins the pod via jax.distributed.initialize()), copy
`--fetch` (default `runs`) back from worker 0, and always delete the queued resource.
Run directories on the workers' disks are lost at teardown except what `--fetch` copies.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from lm.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent.parent
REMOTE_DIR = "lmlab"  # relative to the home directory on every worker
REMOTE_ARCHIVE = "lmlab.tar.gz"

RUNTIME_VERSIONS = {  # accelerator-type prefix -> default TPU VM runtime
    "v6e": "v2-alpha-tpuv6e",
    "v5p": "v2-alpha-tpuv5",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5e": "v2-alpha-tpuv5-lite",
    "v4": "tpu-ubuntu2204-base",
}
FAILED_STATES = {"FAILED", "SUSPENDING", "SUSPENDED", "DELETING"}


def default_runtime(accelerator: str) -> str:
    for prefix, version in RUNTIME_VERSIONS.items():
        if accelerator.startswith(prefix + "-"):
            return version
    raise ConfigError(f"no default --runtime-version for --accelerator {accelerator}; "
                      "pass --runtime-version")


def archive_path(name: str) -> str:
    return os.path.join(tempfile.gettempdir(), f"lmlab-{name}.tar.gz")


def remote_run_command(command: list[str]) -> str:
    return f"cd {REMOTE_DIR} && LMLAB_DISTRIBUTED=auto python3 -m lm.cli {shlex.join(command)}"


INSTALL = (f"mkdir -p {REMOTE_DIR} && tar -xzf {REMOTE_ARCHIVE} -C {REMOTE_DIR} && "
           f"cd {REMOTE_DIR} && python3 -m pip install -q -U pip && "
           "python3 -m pip install -q -e '.[tpu]'")


def commands(name: str, zone: str, accelerator: str, command: list[str], *,
             spot: bool = False, project: str = "", runtime_version: str = "",
             fetch: str = "runs") -> dict[str, list[str]]:
    """The gcloud argv of every step, in order."""
    where = ["--zone", zone] + (["--project", project] if project else [])
    qr = ["gcloud", "compute", "tpus", "queued-resources"]
    vm = ["gcloud", "compute", "tpus", "tpu-vm"]
    steps = {
        "create": qr + ["create", name, "--node-id", name, *where, "--accelerator-type",
                        accelerator, "--runtime-version",
                        runtime_version or default_runtime(accelerator)]
                  + (["--spot"] if spot else []),
        "describe": qr + ["describe", name, *where, "--format=value(state.state)"],
        "copy": vm + ["scp", archive_path(name), f"{name}:{REMOTE_ARCHIVE}", *where,
                      "--worker=all"],
        "install": vm + ["ssh", name, *where, "--worker=all", "--command", INSTALL],
        "run": vm + ["ssh", name, *where, "--worker=all", "--command",
                     remote_run_command(command)],
    }
    if fetch:
        steps["fetch"] = vm + ["scp", "--recurse", f"{name}:{REMOTE_DIR}/{fetch}", ".",
                               *where, "--worker=0"]
    steps["delete"] = qr + ["delete", name, *where, "--force", "--quiet"]
    return steps


def working_tree_files(root: Path = ROOT) -> list[str]:
    """Tracked and untracked-but-not-ignored files (git), else everything but the usual
    build, run and VCS directories."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], cwd=root, capture_output=True,
                             check=True).stdout.decode()
        files = sorted({f for f in out.split("\0") if f})
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", "runs", ".venv", "venv", "__pycache__", ".pytest_cache", "build"}
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*")
                       if p.is_file() and not skip & set(p.relative_to(root).parts))
    return [f for f in files if (root / f).is_file()]


def pack(path: str, root: Path = ROOT) -> int:
    files = working_tree_files(root)
    with tarfile.open(path, "w:gz") as tar:
        for f in files:
            tar.add(root / f, arcname=f, recursive=False)
    return len(files)


def _say(msg: str) -> None:
    print(f"lm launch tpu: {msg}", file=sys.stderr, flush=True)


class StepFailed(Exception):
    pass


def _check(step: str, argv: list[str]) -> None:
    code = subprocess.run(argv).returncode
    if code != 0:
        raise StepFailed(f"{step} failed (exit {code}): {shlex.join(argv)}")


def launch(name: str, zone: str, accelerator: str, command: list[str], *, spot=False,
           project="", runtime_version="", fetch="runs", dry_run=False,
           poll_s: float = 30.0) -> int:
    if not command:
        raise ConfigError("lm launch tpu: no command after --")
    steps = commands(name, zone, accelerator, command, spot=spot, project=project,
                     runtime_version=runtime_version, fetch=fetch)
    if dry_run:
        _say(f"(dry run) the working tree of {ROOT} would be packed into "
             f"{archive_path(name)}; describe repeats every {poll_s:g}s until ACTIVE")
        for argv in steps.values():
            print(shlex.join(argv))
        return 0
    if shutil.which("gcloud") is None:
        raise ConfigError("lm launch tpu: gcloud not found on PATH")

    create_code, ran, code = None, False, 0
    try:
        create_code = subprocess.run(steps["create"]).returncode
        if create_code != 0:  # e.g. the name is taken: not ours to delete
            raise StepFailed(f"create failed (exit {create_code}): "
                             f"{shlex.join(steps['create'])}")
        while True:
            r = subprocess.run(steps["describe"], capture_output=True, text=True)
            status = r.stdout.strip() if r.returncode == 0 else f"unknown ({r.stderr.strip()})"
            _say(f"queued resource {name}: {status}")
            if status == "ACTIVE":
                break
            if status in FAILED_STATES:
                raise StepFailed(f"queued resource {name} is {status}")
            time.sleep(poll_s)
        n = pack(archive_path(name))
        _say(f"packed {n} files into {archive_path(name)}")
        _check("copy", steps["copy"])
        _check("install", steps["install"])
        ran = True
        code = subprocess.run(steps["run"]).returncode
        if code != 0:
            _say(f"the command failed on some worker (exit {code})")
    except StepFailed as e:
        _say(str(e))
        code = 1
    except KeyboardInterrupt:
        _say("interrupted; tearing down")
        code = 130
    finally:
        if ran and "fetch" in steps:
            if subprocess.run(steps["fetch"]).returncode != 0:
                _say(f"could not fetch {fetch} from worker 0")
        if not create_code:  # created, or interrupted while creating
            _say(f"deleting queued resource {name}")
            if subprocess.run(steps["delete"]).returncode != 0:
                _say(f"delete failed; delete it by hand: {shlex.join(steps['delete'])}")
                code = code or 1
    return code
