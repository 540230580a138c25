"""What survives which failure, through the real CLI: a corrupt checkpoint, a full disk,
two writers on one run directory, a pod that loses a process. Each ends in one line, a
documented exit code (lm/errors.py) and, where it can be written, summary.json saying
what happened; nothing finished is lost."""

from __future__ import annotations

import json
import os
import shutil
import signal
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TINY, lm, sets, train_losses, xla_flags

pytestmark = pytest.mark.slow  # `lm` end to end

KEEP3 = [*TINY, "log_every=1", "keep_checkpoints=3"]  # checkpoints 4, 8 and 12 all kept


def _steps(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def garble(step_dir: Path, how: str) -> None:
    """Damage a committed checkpoint as a disk or a copy would: `sectors` overwrites the
    array store's files with random bytes, `cut` truncates every file to half."""
    for f in sorted(p for p in step_dir.rglob("*") if p.is_file()):
        size = f.stat().st_size
        if how == "sectors" and f.parent.name == "d":
            f.write_bytes(os.urandom(size))
        elif how == "cut":
            os.truncate(f, size // 2)


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


# ---------------------------------------------------------------- corrupt checkpoints


def test_corrupt_latest_checkpoint_is_set_aside_and_training_resumes_from_the_one_before(
        tmp_path, lm_here):
    run = tmp_path / "run"
    first = lm("train", "--run-dir", str(run), *sets(*KEEP3))
    assert first.returncode == 0, first.stderr[-2000:]
    uninterrupted = train_losses(run)
    assert _steps(run) == ["12", "4", "8"]
    garble(run / "checkpoints" / "12", "sectors")

    # A reader reports it, uses step 8, and leaves the run dir as it is.
    ev = lm("eval", "--run", str(run), "--batches", "1")
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert json.loads(ev.stdout)["step"] == 8
    warning = one_line(ev.stderr)
    assert warning.startswith(f"warning: checkpoint {run / 'checkpoints' / '12'} is unreadable: ")
    assert warning.endswith("; using step 8") and "renamed" not in warning
    assert _steps(run) == ["12", "4", "8"]

    # The trainer owns the run dir: it renames the bad one aside and re-trains 9..12,
    # reproducing the uninterrupted losses exactly.
    second = lm("train", "--run-dir", str(run), *sets(*KEEP3))
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from step 8" in second.stdout
    warning = one_line(second.stderr)
    assert "checkpoints/12 is unreadable (renamed to 12.corrupt-1): " in warning, warning
    assert train_losses(run) == uninterrupted
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert _steps(run) == ["12", "12.corrupt-1", "4", "8"]  # kept for inspection

    # None intact: one line, exit 2, from each command; nothing trained from scratch.
    for step in ("12", "8", "4"):
        garble(run / "checkpoints" / step, "cut")
    for args in (["eval", "--run", str(run)], ["sample", "--run", str(run)]):
        result = lm_here(*args)
        assert result.returncode == 2, result.stderr
        line = one_line(result.stderr)
        assert line.startswith(f"error: no intact checkpoint in {run / 'checkpoints'}: "
                               "unreadable 12: "), line
        assert "set aside before: 12.corrupt-1" in line
    metrics = (run / "metrics.jsonl").read_text()
    for _ in range(2):  # the second start finds only checkpoints set aside
        result = lm_here("train", "--run-dir", str(run), *sets(*KEEP3))
        assert result.returncode == 2, result.stderr
        assert one_line(result.stderr).startswith("error: no intact checkpoint in ")
    assert _steps(run) == ["12.corrupt-1", "12.corrupt-2", "4.corrupt-1", "8.corrupt-1"]
    assert (run / "metrics.jsonl").read_text() == metrics


def test_a_corrupt_latest_checkpoint_costs_one_warning_line_and_nothing_else(tmp_path):
    """`lm eval`, `lm sample` and `lm train` (resuming) on a run whose newest checkpoint
    is damaged print what they print on the same run without that checkpoint, plus the
    one warning line: none of orbax's own reports of the damage, no asyncio tracebacks
    of the reads left in flight ("Task exception was never retrieved", "Event loop is
    closed"). `sectors`: tensorstore's reads fail; `cut`: orbax's step metadata too."""
    pristine, intact = tmp_path / "pristine", tmp_path / "intact"
    first = lm("train", "--run-dir", str(pristine), *sets(*KEEP3))
    assert first.returncode == 0, first.stderr[-2000:]
    shutil.copytree(pristine, intact)
    shutil.rmtree(intact / "checkpoints" / "12")  # what the fallback must match

    readers = [["eval", "--batches", "1"], ["sample", "--max-new-tokens", "16", "--seed", "3"]]
    clean = {r[0]: lm(r[0], "--run", str(intact), *r[1:]) for r in readers}
    for how in ("sectors", "cut"):
        run = tmp_path / how
        shutil.copytree(pristine, run)
        garble(run / "checkpoints" / "12", how)
        for cmd, *args in readers:
            got, want = lm(cmd, "--run", str(run), *args), clean[cmd]
            assert got.returncode == want.returncode == 0, (how, cmd, got.stderr[-3000:])
            warning, *rest = got.stderr.splitlines()
            assert warning.startswith(f"warning: checkpoint {run / 'checkpoints' / '12'} is "
                                      "unreadable: ") and warning.endswith("; using step 8"), (
                how, cmd, got.stderr[-3000:])
            assert rest == want.stderr.replace(str(intact), str(run)).splitlines(), (
                how, cmd, got.stderr[-3000:])
            assert got.stdout == want.stdout, (how, cmd)

    # The trainer: the same lines as resuming from step 8 of the intact copy, and the
    # warning (it renames the damaged step aside).
    got = lm("train", "--run-dir", str(run), *sets(*KEEP3))
    want = lm("train", "--run-dir", str(intact), *sets(*KEEP3))
    assert got.returncode == want.returncode == 0, got.stderr[-3000:]
    assert want.stderr == ""
    assert one_line(got.stderr).startswith(
        f"warning: checkpoint {run / 'checkpoints' / '12'} is unreadable (renamed to "
        "12.corrupt-1): "), got.stderr
    assert "resumed from step 8" in got.stdout
    assert len(got.stdout.splitlines()) == len(want.stdout.splitlines()), (got.stdout, want.stdout)
    assert train_losses(run) == train_losses(intact) == train_losses(pristine)


def test_a_pod_resumes_past_a_corrupt_checkpoint(tmp_path):
    run = tmp_path / "pod"
    args = ["launch", "local", "--processes", "2", "--devices-per-process", "2", "--",
            "train", "--run-dir", str(run), *sets(*KEEP3, "batch_size=8", "mesh.data=-1")]
    first = lm(*args, timeout=240)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    uninterrupted = train_losses(run)
    garble(run / "checkpoints" / "12", "sectors")
    second = lm(*args, timeout=240)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    assert "[p0] resumed from step 8" in second.stdout and "[p1] resumed from step 8" in second.stdout
    got = train_losses(run)
    assert sorted(got) == sorted(uninterrupted)
    np.testing.assert_allclose([got[k] for k in sorted(got)],
                               [uninterrupted[k] for k in sorted(uninterrupted)], rtol=1e-6)
    assert _steps(run) == ["12", "12.corrupt-1", "4", "8"]


# ---------------------------------------------------------------- two writers


def _start(*args: str) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "lm.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_holder(directory: Path, proc: subprocess.Popen, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        lock = directory / ".lock"
        if lock.exists() and lock.read_text().strip():
            return lock.read_text().strip()
        time.sleep(0.1)
    raise AssertionError(f"{directory} was never locked")


def test_second_trainer_on_a_run_dir_exits_2_naming_the_holder_and_a_crash_leaves_no_lock(
        tmp_path, lm_here):
    run = tmp_path / "run"
    args = ["train", "--run-dir", str(run), *sets(*TINY, "steps=100000", "checkpoint_every=50")]
    first = _start(*args)
    try:
        holder = _wait_for_holder(run, first)
        assert holder == f"pid {first.pid} on host {socket.gethostname()} (lm train)"
        second = lm(*args)
        assert second.returncode == 2, second.stderr[-2000:]
        assert one_line(second.stderr) == (
            f"error: {run} is in use by {holder}; one lm train at a time per directory: "
            "wait for it to end or use another directory")
        assert first.poll() is None  # the holder is untouched
    finally:
        first.kill()  # a crash: the kernel drops the lock with the process
        first.wait()
    # No stale lock: the next trainer gets past it (to the config check after it).
    result = lm_here("train", "--run-dir", str(run),
                     *sets(*TINY, "steps=100000", "checkpoint_every=50", "model.n_layers=3"))
    assert result.returncode == 2
    assert "holds a run with a different config" in one_line(result.stderr)


def test_second_sweep_on_a_workdir_exits_2_and_runs_no_trial(tmp_path):
    spec = tmp_path / "spec.py"
    spec.write_text(textwrap.dedent(f"""
        from lm.sweep import Grid, Sweep
        from lm.config import TrainConfig, apply_overrides
        def sweep():
            base = apply_overrides(TrainConfig(), {[*TINY, 'steps=100000']!r})
            return Sweep(base=base, axes=[Grid("seed", [1, 2])])
    """))
    workdir = tmp_path / "sweep"
    first = _start("sweep", str(spec), "--workdir", str(workdir))
    try:
        holder = _wait_for_holder(workdir, first)
        assert holder.startswith(f"pid {first.pid} on host ") and holder.endswith("(lm sweep)")
        second = lm("sweep", str(spec), "--workdir", str(workdir))
        assert second.returncode == 2, second.stderr[-2000:]
        assert one_line(second.stderr).startswith(f"error: {workdir} is in use by {holder};")
        assert second.stdout == ""  # it started nothing
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)


# ---------------------------------------------------------------- a full disk


def _assert_stopped_by_full_disk(result, run: Path, path: Path, intact: list[str]):
    assert result.returncode == 4, result.stdout[-1000:] + result.stderr[-3000:]
    assert one_line(result.stderr) == (
        f"error: no space left on device writing {path}; checkpoints up to step "
        f"{max(map(int, intact))} are intact: free space and rerun the same command to resume")
    assert json.loads((run / "summary.json").read_text())["status"] == (
        f"failed: no space left on device ({path})")
    assert _steps(run) == intact  # nothing half-written left to be taken for a checkpoint


@pytest.mark.parametrize("fault, what", [("enospc@12", "checkpoint"),
                                         ("enospc-metrics@10", "metrics")])
def test_injected_full_disk_is_one_line_exit_4_and_the_rerun_resumes(tmp_path, fault, what):
    run = tmp_path / "run"
    result = lm("train", "--run-dir", str(run), *sets(*TINY), env={"LMLAB_FAULT": fault})
    path = run / "checkpoints" / "12" if what == "checkpoint" else run / "metrics.jsonl"
    _assert_stopped_by_full_disk(result, run, path, ["4", "8"])
    again = lm("train", "--run-dir", str(run), *sets(*TINY))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from step 8" in again.stdout
    assert sorted(train_losses(run)) == [2, 4, 6, 8, 10, 12]


@pytest.fixture
def small_filesystem(tmp_path):
    """A real size-limited filesystem: a tmpfs mounted in tmp_path (root only);
    yields (mount point, resize(kib))."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    where = tmp_path / "fs"
    where.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(where)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")

    def resize(kib: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={kib}k", str(where)], check=True)

    try:
        yield where, resize
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_disk_filling_up_during_an_async_checkpoint_save(small_filesystem):
    where, resize = small_filesystem
    run = where / "run"
    first = lm("train", "--run-dir", str(run), *sets(*TINY), env={"LMLAB_FAULT": "sigterm@8"})
    assert first.returncode == 128 + 15, first.stderr[-2000:]
    # Room left for the log lines and the evaluation, not for a third checkpoint (~0.5 MB).
    used_kib = os.statvfs(where).f_frsize * (os.statvfs(where).f_blocks
                                             - os.statvfs(where).f_bfree) // 1024
    resize(used_kib + 150)
    full = lm("train", "--run-dir", str(run), *sets(*TINY))
    _assert_stopped_by_full_disk(full, run, run / "checkpoints" / "12", ["4", "8"])
    resize(16 * 1024)
    again = lm("train", "--run-dir", str(run), *sets(*TINY))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from step 8" in again.stdout


# ---------------------------------------------------------------- a pod loses a process


def _committed(run: Path) -> list[int]:
    return sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())


@pytest.mark.parametrize("killed", [0, 1])
def test_a_pod_started_by_hand_that_loses_a_process_says_which_and_where_to_resume(
        tmp_path, killed):
    """Two processes started as SLURM or TPU workers are (the LMLAB_* variables, no `lm
    launch`); one is killed with kill -9 after checkpoint 4. The survivor exits 5 with
    one line, instead of a gloo traceback and an abort with a native stack dump."""
    from lm.launch.local import free_port

    run, port = tmp_path / "run", free_port()
    procs, logs = [], []
    for i in (0, 1):
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                   XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=2"),
                   LMLAB_COORDINATOR=f"127.0.0.1:{port}", LMLAB_NUM_PROCESSES="2",
                   LMLAB_PROCESS_ID=str(i))
        out, err = (open(tmp_path / f"p{i}.{s}", "w") for s in ("out", "err"))
        logs.append((out, err))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "lm.cli", "train", "--run-dir", str(run),
             *sets(*TINY, "steps=100000", "batch_size=8", "mesh.data=-1", "eval_every=1000")],
            cwd=ROOT, env=env, stdout=out, stderr=err))
    try:
        deadline = time.monotonic() + 240
        while not (run / "checkpoints" / "4").is_dir():
            assert all(p.poll() is None for p in procs), (tmp_path / "p0.err").read_text()[-3000:]
            assert time.monotonic() < deadline, "checkpoint 4 never committed"
            time.sleep(0.2)
        procs[killed].kill()
        survivor = procs[1 - killed]
        code = survivor.wait(timeout=90)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for out, err in logs:
            out.close()
            err.close()
    err = (tmp_path / f"p{1 - killed}.err").read_text()
    out = (tmp_path / f"p{1 - killed}.out").read_text()
    assert code == 5, err[-3000:]
    lost = "process 0 (the coordinator)" if killed == 0 else "process 1"
    assert one_line(err) == (f"error: the pod lost {lost}; rerun resumes from step "
                             f"{max(_committed(run))}")
    assert "Traceback" not in out + err and "Check failure" not in out + err
    if killed == 1:  # process 0, which writes the summary, survived
        assert json.loads((run / "summary.json").read_text())["status"] == (
            "failed: the pod lost process 1")


def test_a_pod_on_a_held_run_dir_exits_2_on_every_process(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(  # holds the run dir as a trainer does, until killed
        [sys.executable, "-c", "import sys, time\nfrom lm.lock import hold\n"
         "with hold(sys.argv[1], 'lm train'):\n    print('held', flush=True)\n"
         "    time.sleep(600)\n", str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        result = lm("launch", "local", "--processes", "2", "--devices-per-process", "4", "--",
                    "train", "--run-dir", str(run), *sets(*TINY, "batch_size=8", "mesh.data=-1"),
                    timeout=240)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    refusal = (f"error: {run} is in use by pid {holder.pid} on host {socket.gethostname()} "
               "(lm train); one lm train at a time per directory")
    for p in (0, 1):
        assert any(line.startswith(f"[p{p}] {refusal}") for line in result.stderr.splitlines()), (
            result.stderr[-3000:])
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing written


# ---------------------------------------------------------------- batched groups
# The same failures for K trials trained as one program (`lm train-group`, which `lm
# sweep --batch` runs; lm/train/trials.py through the one driver, lm/train/driver.py):
# each trial's run dir ends as a lone run's would, and a rerun resumes the group.

TRIALS = (("a", ["optim.lr=2e-3", "seed=1", "data.seed=1"]),  # own inits and data orders
          ("b", ["optim.lr=5e-3", "seed=2", "data.seed=2"]))


def _group(root: Path, overrides: list[str], env: dict | None = None, run=None):
    """`lm train-group` of trials a and b in `root`/a and `root`/b (`run`: how to run
    `lm`, default a subprocess)."""
    from lm.configs import DEFAULT_CONFIG
    root.mkdir(parents=True, exist_ok=True)
    spec = root / "group.json"
    spec.write_text(json.dumps({"base_config": str(DEFAULT_CONFIG), "trials": [
        {"name": name, "overrides": [*overrides, *own, f"name={name}"],
         "run_dir": str(root / name)} for name, own in TRIALS]}))
    return run("train-group", str(spec)) if run else lm("train-group", str(spec), env=env)


def _same_losses(run: Path, reference: Path) -> None:
    got, want = train_losses(run), train_losses(reference)
    assert sorted(got) == sorted(want) == list(range(1, 13))
    np.testing.assert_allclose([got[s] for s in want], [want[s] for s in want], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def group_reference(tmp_path_factory) -> Path:
    """An uninterrupted group (KEEP3: every step logged, checkpoints 4, 8, 12 kept)."""
    root = tmp_path_factory.mktemp("group") / "reference"
    result = _group(root, KEEP3)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return root


def test_a_group_sets_a_trials_corrupt_checkpoint_aside_and_resumes_from_the_one_before(
        group_reference, tmp_path, lm_here):
    root = tmp_path / "group"
    for name, _ in TRIALS:
        shutil.copytree(group_reference / name, root / name)
    garble(root / "b" / "checkpoints" / "12", "sectors")
    second = _group(root, KEEP3)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    assert "resumed 2 trials from step 8" in second.stdout
    warning = one_line(second.stderr)
    assert "b/checkpoints/12 is unreadable (renamed to 12.corrupt-1): " in warning, warning
    assert warning.endswith("; using step 8")
    for name, _ in TRIALS:
        _same_losses(root / name, group_reference / name)
        assert json.loads((root / name / "summary.json").read_text())["status"] == "completed"
    # a's step 12, intact, is kept as it was (never written twice); b's is re-trained.
    assert _steps(root / "a") == ["12", "4", "8"]
    assert _steps(root / "b") == ["12", "12.corrupt-1", "4", "8"]

    # None of b's intact: one line, exit 2; nothing trained from scratch.
    for step in ("12", "8", "4"):
        garble(root / "b" / "checkpoints" / step, "cut")
    metrics = (root / "a" / "metrics.jsonl").read_text()
    third = _group(root, KEEP3, run=lm_here)
    assert third.returncode == 2, third.stderr[-3000:]
    assert one_line(third.stderr).startswith(
        f"error: no intact checkpoint in {root / 'b' / 'checkpoints'}: unreadable 12")
    assert (root / "a" / "metrics.jsonl").read_text() == metrics


def test_a_hard_killed_group_resumes_like_the_uninterrupted_group(group_reference, tmp_path):
    root = tmp_path / "group"
    first = _group(root, KEEP3, env={"LMLAB_FAULT": "sigkill@6"})
    assert first.returncode == -9, first.stderr[-3000:]
    assert max(train_losses(root / "a")) == 6
    second = _group(root, KEEP3)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    assert "resumed 2 trials from step 4" in second.stdout  # checkpoint_every=4
    for name, _ in TRIALS:
        _same_losses(root / name, group_reference / name)
        assert json.loads((root / name / "summary.json").read_text())["status"] == "completed"


@pytest.mark.parametrize("fault, what", [("enospc@12", "checkpoint"),
                                         ("enospc-metrics@10", "metrics")])
def test_a_group_on_an_injected_full_disk_exits_4_with_every_trial_accounted_for(
        tmp_path, fault, what):
    root = tmp_path / "group"
    result = _group(root, TINY, env={"LMLAB_FAULT": fault})
    # The first trial's write fails; the group stops, and says so in every trial's dir.
    path = root / "a" / "checkpoints" / "12" if what == "checkpoint" else root / "a" / "metrics.jsonl"
    for name, _ in TRIALS:
        _assert_stopped_by_full_disk(result, root / name, path, ["4", "8"])
    again = _group(root, TINY)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed 2 trials from step 8" in again.stdout
    for name, _ in TRIALS:
        assert sorted(train_losses(root / name)) == [2, 4, 6, 8, 10, 12]
        assert json.loads((root / name / "summary.json").read_text())["status"] == "completed"


def test_a_group_filling_the_disk_during_its_async_checkpoint_saves(small_filesystem):
    where, resize = small_filesystem
    root = where / "group"
    first = _group(root, TINY, env={"LMLAB_FAULT": "sigterm@8"})
    assert first.returncode == 128 + 15, first.stderr[-2000:]
    used_kib = os.statvfs(where).f_frsize * (os.statvfs(where).f_blocks
                                             - os.statvfs(where).f_bfree) // 1024
    resize(used_kib + 150)  # room for logs and evaluations, not for a third checkpoint
    full = _group(root, TINY)
    assert full.returncode == 4, full.stdout[-1000:] + full.stderr[-3000:]
    failed = one_line(full.stderr).split("writing ", 1)[1].split(";", 1)[0]
    assert failed in {str(root / name / "checkpoints" / "12") for name, _ in TRIALS}, failed
    for name, _ in TRIALS:  # no half-written *.orbax-checkpoint-tmp* left, no "running"
        _assert_stopped_by_full_disk(full, root / name, Path(failed), ["4", "8"])
    resize(16 * 1024)
    again = _group(root, TINY)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed 2 trials from step 8" in again.stdout


def test_a_group_step_that_is_nan_is_diverged_there_in_every_trial_and_never_checkpointed(
        tmp_path):
    root = tmp_path / "group"
    result = _group(root, [*TINY, "log_every=1"], env={"LMLAB_FAULT": "nan@8"})
    assert result.returncode == 3, result.stderr[-2000:]
    for name, _ in TRIALS:
        summary = json.loads((root / name / "summary.json").read_text())
        assert summary["status"] == "diverged at step 8" and summary["steps"] == 7
        assert max(train_losses(root / name)) == 7
        assert _steps(root / name) == ["4"]  # checkpoint_every=4: 8 was never written
