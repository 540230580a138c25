"""Multi-process launching: pod detection from the environment, the TPU and SLURM
launchers' commands (dry runs), and a real two-process CPU pod on this machine."""

from __future__ import annotations

import shlex
import sys
import tempfile

import numpy as np
import pytest

from conftest import ROOT, TINY, lm, sets, train_losses
from lm.config import ConfigError
from lm.parallel.distributed import detect

# ------------------------------------------------------------------ detect()

TIMEOUTS = {"heartbeat_timeout_seconds": 10, "initialization_timeout": 120,
            "shutdown_timeout_seconds": 60}


def test_detect_explicit_env():
    env = {"LMLAB_COORDINATOR": "10.0.0.1:1234", "LMLAB_NUM_PROCESSES": "4",
           "LMLAB_PROCESS_ID": "3", "LMLAB_HEARTBEAT_TIMEOUT": "5",
           "SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_PROCID": "0"}  # explicit wins
    assert detect(env) == {"kind": "explicit", "kwargs": {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3,
        **TIMEOUTS, "heartbeat_timeout_seconds": 5}}


def test_detect_slurm_tpu_auto_and_none():
    assert detect({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_PROCID": "2"}) == {
        "kind": "slurm", "kwargs": TIMEOUTS}
    assert detect({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    assert detect({"TPU_WORKER_HOSTNAMES": "t-w-0,t-w-1,t-w-2,t-w-3"})["kind"] == "tpu"
    assert detect({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
    assert detect({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2"})["kind"] == "tpu"
    assert detect({"LMLAB_DISTRIBUTED": "auto"})["kind"] == "auto"
    assert detect({"LMLAB_DISTRIBUTED": "off", "SLURM_JOB_ID": "7", "SLURM_NTASKS": "8",
                   "SLURM_PROCID": "0"}) is None
    assert detect({"LMLAB_DISTRIBUTED": "auto", "LMLAB_LOCAL_DEVICES": "0,1,2,3"})[
        "kwargs"]["local_device_ids"] == [0, 1, 2, 3]
    assert detect({}) is None
    assert detect({"PATH": "/usr/bin", "HOME": "/root"}) is None


@pytest.mark.parametrize("env, words", [
    ({"LMLAB_COORDINATOR": "h:1", "LMLAB_NUM_PROCESSES": "2", "LMLAB_PROCESS_ID": "x"},
     "LMLAB_PROCESS_ID"),
    ({"LMLAB_COORDINATOR": "h:1", "LMLAB_NUM_PROCESSES": "2", "LMLAB_PROCESS_ID": "2"},
     "must be <"),
    ({"LMLAB_COORDINATOR": "nohostport", "LMLAB_NUM_PROCESSES": "2", "LMLAB_PROCESS_ID": "0"},
     "host:port"),
    ({"LMLAB_COORDINATOR": "h:1"}, "missing"),
    ({"LMLAB_DISTRIBUTED": "auto", "LMLAB_HEARTBEAT_TIMEOUT": "soon"}, "LMLAB_HEARTBEAT_TIMEOUT"),
])
def test_detect_rejects_bad_values(env, words):
    with pytest.raises(ConfigError, match=words):
        detect(env)


def test_bad_distributed_env_is_one_line_exit_2():
    r = lm("bench", env={"LMLAB_COORDINATOR": "127.0.0.1:1", "LMLAB_NUM_PROCESSES": "2",
                         "LMLAB_PROCESS_ID": "two"})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: LMLAB_PROCESS_ID='two' is not an integer"]


@pytest.mark.parametrize("args, words", [
    (["launch", "local", "--processes", "2"], "after --"),
    (["launch", "local", "--processes", "2", "--"], "no command"),
    (["launch", "local", "--processes", "two", "--", "train"], "invalid int"),
    (["launch", "local", "--processes", "0", "--", "train"], "--processes"),
    (["launch", "slurm", "--nodes", "2", "--", "train"], "--gpus-per-node"),
    (["launch", "tpu", "--name", "x", "--zone", "z", "--accelerator", "v9z-8", "--dry-run",
      "--", "train"], "--runtime-version"),
])
def test_launch_usage_errors_are_one_line(lm_here, args, words):
    r = lm_here(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], r.stderr


# ------------------------------------------------------------------ dry runs


def test_tpu_dry_run_prints_the_gcloud_commands_in_order(lm_here):
    r = lm_here("launch", "tpu", "--name", "pod1", "--zone", "us-east5-a", "--accelerator",
                "v5p-64", "--spot", "--project", "proj", "--dry-run", "--",
                "train", "--run-dir", "runs/my run", "--set", "model.n_layers=4")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    where = "--zone us-east5-a --project proj"
    archive = shlex.quote(f"{tempfile.gettempdir()}/lmlab-pod1.tar.gz")
    user = "train --run-dir 'runs/my run' --set model.n_layers=4"
    run_remote = f"cd lmlab && LMLAB_DISTRIBUTED=auto python3 -m lm.cli {user}"
    assert lines == [
        f"gcloud compute tpus queued-resources create pod1 --node-id pod1 {where} "
        "--accelerator-type v5p-64 --runtime-version v2-alpha-tpuv5 --spot",
        f"gcloud compute tpus queued-resources describe pod1 {where} "
        "'--format=value(state.state)'",
        f"gcloud compute tpus tpu-vm scp {archive} pod1:lmlab.tar.gz {where} --worker=all",
        f"gcloud compute tpus tpu-vm ssh pod1 {where} --worker=all --command "
        + shlex.quote("mkdir -p lmlab && tar -xzf lmlab.tar.gz -C lmlab && cd lmlab && "
                      "python3 -m pip install -q -U pip && "
                      "python3 -m pip install -q -e '.[tpu]'"),
        f"gcloud compute tpus tpu-vm ssh pod1 {where} --worker=all --command "
        + shlex.quote(run_remote),
        f"gcloud compute tpus tpu-vm scp --recurse pod1:lmlab/runs . {where} --worker=0",
        f"gcloud compute tpus queued-resources delete pod1 {where} --force --quiet",
    ]
    # The remote command survives the shell on the workers intact.
    assert shlex.split(shlex.split(lines[4])[-1])[-5:] == [
        "train", "--run-dir", "runs/my run", "--set", "model.n_layers=4"]


def test_tpu_dry_run_without_spot_or_fetch(lm_here):
    r = lm_here("launch", "tpu", "--name", "p", "--zone", "z", "--accelerator", "v4-32",
                "--runtime-version", "rt", "--fetch", "", "--dry-run", "--", "bench")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0] == ("gcloud compute tpus queued-resources create p --node-id p --zone z "
                        "--accelerator-type v4-32 --runtime-version rt")
    assert len(lines) == 6 and "scp --recurse" not in r.stdout
    assert lines[-1] == "gcloud compute tpus queued-resources delete p --zone z --force --quiet"


def test_slurm_dry_run_prints_the_sbatch_script(lm_here):
    r = lm_here("launch", "slurm", "--nodes", "2", "--gpus-per-node", "8", "--partition", "a100",
                "--time", "04:00:00", "--job-name", "big", "--dry-run", "--",
                "train", "--config", "configs/default.py", "--set", "steps=100")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "#!/bin/bash"
    sbatch = [ln for ln in lines if ln.startswith("#SBATCH")]
    assert sbatch[:6] == ["#SBATCH --job-name=big", "#SBATCH --nodes=2",
                          "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                          "#SBATCH --partition=a100", "#SBATCH --time=04:00:00"]
    assert lines[-1] == (f"srun --kill-on-bad-exit=1 {shlex.quote(sys.executable)} -m lm.cli "
                         "train --config configs/default.py --set steps=100")
    assert f"cd {ROOT}" in lines
    assert not (ROOT / "slurm" / "big.sbatch").exists()  # a dry run writes nothing

    r = lm_here("launch", "slurm", "--nodes", "3", "--gpus-per-node", "4", "--per", "node",
                "--dry-run", "--", "train")
    assert "#SBATCH --ntasks-per-node=1" in r.stdout.splitlines()
    assert "export LMLAB_LOCAL_DEVICES=0,1,2,3" in r.stdout.splitlines()


# ------------------------------------------------------------------ a real local pod

POD = TINY + ["batch_size=8", "mesh.data=-1"]  # 8 devices: the global batch divides by 8


@pytest.fixture(scope="module")
def single_losses(tmp_path_factory):
    """The reference: one process with 8 simulated devices."""
    run = tmp_path_factory.mktemp("single") / "run"
    r = lm("train", "--run-dir", str(run), *sets(*POD),
           env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert r.returncode == 0, r.stderr[-2000:]
    return train_losses(run)


def pod(run, env=None, timeout=240):
    return lm("launch", "local", "--processes", "2", "--devices-per-process", "4", "--",
              "train", "--run-dir", str(run), *sets(*POD), env=env, timeout=timeout)


def assert_same_losses(got, want):
    assert sorted(got) == sorted(want)
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                               rtol=1e-5)


@pytest.mark.slow
def test_two_process_pod_matches_one_process(tmp_path, single_losses):
    run = tmp_path / "pod"
    r = pod(run)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "[p0] " in r.stdout and "[p1] " in r.stdout
    assert "over 2 process(es)" in r.stdout
    assert_same_losses(train_losses(run), single_losses)


@pytest.mark.slow
def test_killed_process_stops_the_pod_and_the_rerun_resumes(tmp_path, single_losses):
    run = tmp_path / "pod"
    # Process 1 alone is SIGKILLed after step 6 (last checkpoint: step 4).
    r = pod(run, env={"LMLAB_FAULT": "sigkill@6", "LMLAB_FAULT_PROCESS": "1"}, timeout=120)
    assert r.returncode != 0
    message = [ln for ln in r.stderr.splitlines() if ln.startswith("lm launch:")]
    assert message == ["lm launch: process 1 exited with code -9 (SIGKILL); "
                       "stopped the other processes"], r.stderr[-3000:]

    r = pod(run)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "resumed from step 4" in r.stdout
    assert_same_losses(train_losses(run), single_losses)
