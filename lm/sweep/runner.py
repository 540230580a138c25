"""Run a sweep: every trial is `python -m lm.cli train` in `<workdir>/<trial>`, N at a time.

A trial runs in its own process (and session), so a crash cannot take the sweep down.
Rerunning the sweep skips trials whose summary.json says "completed" (or "diverged ...":
a deterministic result, rerunning would diverge again) and resumes the others (`lm
train` resumes from its checkpoint by itself). A crash (exit not 0/3/128+sig) is written
into the trial's summary.json as "failed: exit N" unless the trainer left a final status.
SIGINT/SIGTERM: forwarded to running trials (they checkpoint and stop), no new trials
start, the sweep exits 128+signal. Trial output goes to `<workdir>/<trial>/train.log`. Each invocation appends its wall
time, what it ran and the machine (`machine()`) to `<workdir>/sweep_times.jsonl`, which
the findings page sums (`lm findings`).

Batched trials (`--batch K` or `Sweep.batch`): the trials still to run are grouped, in
order, into groups of at most K that may train as one program (lm/train/trials.py:
equal but for the scalars it batches); a group runs as one `lm train-group` process,
its output in `<workdir>/groups/<group>.log`, and each of its trials is accounted for
by its own summary.json as if it had run alone. A trial that fits no group runs alone.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from lm import config as config_lib
from lm.config import ConfigError, TrainConfig
from lm.errors import EXIT_DIVERGED, EXIT_OK, exit_for_signal
from lm.lock import hold
from lm.sweep.spec import Sweep, Trial, base_config, expand, load_spec, prepare_hook

_FINAL = ("completed", "diverged")


TIMES = "sweep_times.jsonl"


def machine() -> dict:
    """The machine kind a wall time was measured on: CPU model, cores, memory."""
    from lm.chips import cpu_model
    cpu = cpu_model()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "memory_gib": round(mem)}


def _record_time(wd: Path, started: float, todo: int, done: int, smoke: bool) -> None:
    with open(wd / TIMES, "a") as f:
        f.write(json.dumps({"started": started, "wall_s": round(time.time() - started, 1),
                            "trials_to_run": todo, "trials_ended": done, "smoke": smoke,
                            **machine()}) + "\n")


def _base_path(sweep: Sweep, workdir: Path) -> Path:
    if isinstance(sweep.base, TrainConfig):
        return workdir / "base_config.py"
    return Path(sweep.base).resolve()


def _write_base(sweep: Sweep, workdir: Path) -> None:
    """A TrainConfig base becomes a config file in the workdir (JSON + a loader)."""
    if not isinstance(sweep.base, TrainConfig):
        return
    (workdir / "base_config.json").write_text(config_lib.to_json(sweep.base))
    (workdir / "base_config.py").write_text(
        '"""Base config of this sweep (written by lm sweep)."""\n'
        "from pathlib import Path\n\nfrom lm.config import from_json\n\n\n"
        "def config():\n"
        "    return from_json((Path(__file__).parent / 'base_config.json').read_text())\n")


def command(trial: Trial, base: Path, run_dir: Path, launch: Sequence[str] = ()) -> list[str]:
    """The trial's `lm train` command; with `launch` (e.g. ["local", "--processes", "2"])
    it runs through `lm launch <launch> -- train ...`, whose exit code is the trainer's."""
    cmd = [sys.executable, "-m", "lm.cli", *(["launch", *launch, "--"] if launch else []),
           "train", "--config", str(base), "--run-dir", str(run_dir)]
    for o in [*trial.overrides, f"name={trial.name}"]:
        cmd += ["--set", o]
    return cmd


def plan_groups(trials: list[Trial], sweep: Sweep, batch: int) -> list[list[Trial]]:
    """The trials in units that run as one process: groups of up to `batch` compatible
    trials (lm.train.trials.group_configs), in the sweep's order of first members."""
    if batch <= 1 or len(trials) <= 1:
        return [[t] for t in trials]
    from lm.train.trials import group_configs  # (imports JAX: only when batching)
    base = base_config(sweep)
    cfgs = [config_lib.apply_overrides(base, [*t.overrides, f"name={t.name}"]) for t in trials]
    return [[trials[i] for i in idx] for idx in group_configs(cfgs, batch)]


def group_command(group_file: Path) -> list[str]:
    return [sys.executable, "-m", "lm.cli", "train-group", str(group_file)]


def _write_group(wd: Path, gid: str, unit: list[Trial], base: Path) -> Path:
    path = wd / "groups" / f"{gid}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"base_config": str(base), "trials": [
        {"name": t.name, "overrides": [*t.overrides, f"name={t.name}"],
         "run_dir": str((wd / t.name).resolve())} for t in unit]}, indent=2))
    return path


def _trial_code(code: int, unit: list[Trial], run_dir: Path) -> int:
    """A trial's exit code: a group's process exits 0 only when all its trials
    completed, so within a group each trial's own summary.json tells."""
    if len(unit) == 1 or code not in (EXIT_OK, EXIT_DIVERGED):
        return code
    status = read_status(run_dir) or ""
    return EXIT_DIVERGED if status.startswith("diverged") else (
        EXIT_OK if status == "completed" else code)


def _read_summary(run_dir: Path) -> dict:
    """The run's summary.json, or {} when it is missing, partly written or not a dict."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def read_status(run_dir: Path) -> str | None:
    return _read_summary(run_dir).get("status")


def _mark_failed(run_dir: Path, code: int, status_text: str | None = None) -> str:
    path = run_dir / "summary.json"
    summary = _read_summary(run_dir)
    status = summary.get("status")
    if isinstance(status, str) and status.startswith((*_FINAL, "failed: no space")):
        return status  # the trainer's own account (a full disk: exit 4) says more
    if status_text == "interrupted" and status is None:
        return f"interrupted (exit {code}, nothing written yet)"
    summary["status"] = status_text or f"failed: exit {code}"
    if run_dir.is_dir():
        try:  # the run dir's one writer for the moment: never over another's summary
            with hold(run_dir, "lm sweep"):
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(summary, indent=2))
                tmp.replace(path)
        except ConfigError:  # e.g. an `lm train` started by hand on the trial's run dir
            return f"{summary['status']} (its run dir is held by another process)"
    return summary["status"]


def _final_loss(run_dir: Path) -> str:
    loss = _read_summary(run_dir).get("final_val_loss")
    return f" val {loss:.4f}" if isinstance(loss, (int, float)) else ""


def run_sweep(spec_path: str, workdir: str, *, parallel: int = 1, dry_run: bool = False,
              smoke: bool = False, launch: Sequence[str] = (), batch: int | None = None) -> int:
    if parallel < 1:
        raise ConfigError(f"--parallel must be >= 1, got {parallel}")
    wd = Path(workdir)
    prepare = prepare_hook(spec_path)
    if prepare is not None and not dry_run:
        with hold(wd, "lm sweep"):
            print(f"prepare: {spec_path} prepare(workdir={wd}, smoke={smoke})", flush=True)
            prepare(workdir=wd, smoke=smoke)
    sweep = load_spec(spec_path, smoke=smoke, workdir=wd)
    batch = sweep.batch if batch is None else batch
    if batch < 1:
        raise ConfigError(f"--batch must be >= 1 (1 = each trial alone), got {batch}")
    if batch > 1 and launch:
        raise ConfigError("--batch with --launch: a batched group trains in one process; "
                          "use --batch 1 to launch each trial as a pod job")
    trials = expand(sweep, smoke=smoke)   # validates every trial before anything runs
    base = _base_path(sweep, wd.resolve())
    if dry_run:
        units = plan_groups(trials, sweep, batch)
        for n, unit in enumerate(units):
            if len(unit) == 1:
                print(unit[0].name)
                print("  " + shlex.join(command(unit[0], base, wd / unit[0].name, launch)))
            else:
                print(f"group g{n:03d}: {len(unit)} trials as one program: "
                      + ", ".join(t.name for t in unit))
        groups = sum(len(u) > 1 for u in units)
        print(f"{len(trials)} trials in {len(units)} processes ({groups} batched groups; "
              f"--batch {batch}) (dry run: nothing written)")
        return 0

    # One sweep per workdir at a time: a second would start the same trials again
    # (each trial's run dir is locked by its trainer too, so it would fail them).
    with hold(wd, "lm sweep"):
        _write_base(sweep, wd.resolve())
        (wd / "sweep.json").write_text(json.dumps({
            "spec": str(Path(spec_path).resolve()), "smoke": smoke, "base_config": str(base),
            "trials": [{**t.to_dict(), "command": command(t, base, wd / t.name, launch)}
                       for t in trials],
        }, indent=2, default=str))

        todo, tally = [], {"completed": 0, "diverged": 0, "failed": 0, "interrupted": 0,
                           "skipped": 0}
        for t in trials:
            status = read_status(wd / t.name)
            if status is not None and status.startswith(_FINAL):
                print(f"skip {t.name}: {status}", flush=True)
                tally["skipped"] += 1
            else:
                todo.append(t)
        print(f"{len(trials)} trials: {len(todo)} to run, {tally['skipped']} already done; "
              f"{parallel} at a time; logs in {wd}/<trial>/train.log", flush=True)

        units = plan_groups(todo, sweep, batch)
        if any(len(u) > 1 for u in units):
            print(f"batched: {len(todo)} trials in {len(units)} processes (groups of up to "
                  f"{batch}; logs of groups in {wd}/groups/)", flush=True)
        stop = {"sig": 0}
        wall0 = time.time()
        running: dict[subprocess.Popen, tuple[list[Trial], float, object, Path]] = {}

        def handle(signum, frame):
            if not stop["sig"]:
                print(f"\nsignal {signum}: stopping running trials (they checkpoint), starting "
                      "no new ones", flush=True)
            stop["sig"] = signum
            for p in list(running):
                if p.poll() is None:
                    try:
                        p.send_signal(signum)
                    except ProcessLookupError:
                        pass

        old = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        done = 0
        try:
            queue = list(enumerate(units))
            while queue or running:
                while queue and len(running) < parallel and not stop["sig"]:
                    n, unit = queue.pop(0)
                    for t in unit:
                        (wd / t.name).mkdir(parents=True, exist_ok=True)
                    if len(unit) == 1:
                        log_path = wd / unit[0].name / "train.log"
                        cmd = command(unit[0], base, wd / unit[0].name, launch)
                    else:
                        gid = f"g{n:03d}"
                        log_path = wd / "groups" / f"{gid}.log"
                        cmd = group_command(_write_group(wd, gid, unit, base))
                        for t in unit:
                            with open(wd / t.name / "train.log", "a") as f:
                                f.write(f"batched with {len(unit) - 1} other trial(s): "
                                        f"see {log_path}\n")
                    log = open(log_path, "a")  # noqa: SIM115 (closed when the unit ends)
                    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
                    running[p] = (unit, time.perf_counter(), log, log_path)
                if stop["sig"] and not running:
                    break
                time.sleep(0.2)
                for p in [p for p in running if p.poll() is not None]:
                    unit, t0, log, log_path = running.pop(p)
                    log.close()
                    for t in unit:
                        done += 1
                        run_dir = wd / t.name
                        code = _trial_code(p.returncode, unit, run_dir)
                        if code == EXIT_OK:
                            status, key = "completed", "completed"
                        elif code == EXIT_DIVERGED:
                            status, key = read_status(run_dir) or "diverged", "diverged"
                        elif code > 128 or code < 0 or stop["sig"]:
                            # signalled (by us or from outside), possibly before the trainer
                            # had installed its handler: a trial to resume, not a failure
                            status, key = read_status(run_dir), "interrupted"
                            if status is None or not status.startswith(("interrupted", *_FINAL)):
                                status = _mark_failed(run_dir, code, "interrupted")
                        else:
                            status, key = _mark_failed(run_dir, code), "failed"
                            status += f" (see {log_path})"
                        tally[key] += 1
                        print(f"[{done}/{len(todo)}] {t.name}: {status}"
                              f"{_final_loss(run_dir) if key == 'completed' else ''} "
                              f"({time.perf_counter() - t0:.0f}s)", flush=True)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        not_started = len(todo) - done
        _record_time(wd, wall0, len(todo), done, smoke)
        print("sweep: " + ", ".join(f"{v} {k}" for k, v in tally.items() if v)
              + (f", {not_started} not started" if not_started else "")
              + f" of {len(trials)} trials", flush=True)
        if stop["sig"]:
            return exit_for_signal(stop["sig"])
        return 1 if tally["failed"] else 0
