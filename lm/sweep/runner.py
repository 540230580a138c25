"""Run a sweep: every trial is `python -m lm.cli train` in `<workdir>/<trial>`, N at a time.

A trial runs in its own process (and session), so a crash cannot take the sweep down.
Rerunning the sweep skips trials whose summary.json says "completed" (or "diverged ...":
a deterministic result, rerunning would diverge again) and resumes the others (`lm
train` resumes from its checkpoint by itself). A crash (exit not 0/3/128+sig) is written
into the trial's summary.json as "failed: exit N" unless the trainer left a final status.
SIGINT/SIGTERM: forwarded to running trials (they checkpoint and stop), no new trials
start, the sweep exits 128+signal. Trial output goes to `<workdir>/<trial>/train.log`.
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
from lm.sweep.spec import Sweep, Trial, expand, load_spec

_FINAL = ("completed", "diverged")


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
              smoke: bool = False, launch: Sequence[str] = ()) -> int:
    if parallel < 1:
        raise ConfigError(f"--parallel must be >= 1, got {parallel}")
    sweep = load_spec(spec_path, smoke=smoke)
    trials = expand(sweep, smoke=smoke)   # validates every trial before anything runs
    wd = Path(workdir)
    base = _base_path(sweep, wd.resolve())
    if dry_run:
        for t in trials:
            print(t.name)
            print("  " + shlex.join(command(t, base, wd / t.name, launch)))
        print(f"{len(trials)} trials (dry run: nothing written)")
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

        stop = {"sig": 0}
        running: dict[subprocess.Popen, tuple[Trial, float, object]] = {}

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
            queue = list(todo)
            while queue or running:
                while queue and len(running) < parallel and not stop["sig"]:
                    t = queue.pop(0)
                    run_dir = wd / t.name
                    run_dir.mkdir(parents=True, exist_ok=True)
                    log = open(run_dir / "train.log", "a")  # noqa: SIM115 (closed when the trial ends)
                    p = subprocess.Popen(command(t, base, run_dir, launch), stdout=log,
                                         stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
                    running[p] = (t, time.perf_counter(), log)
                if stop["sig"] and not running:
                    break
                time.sleep(0.2)
                for p in [p for p in running if p.poll() is not None]:
                    t, t0, log = running.pop(p)
                    log.close()
                    done += 1
                    run_dir = wd / t.name
                    code = p.returncode
                    if code == EXIT_OK:
                        status, key = "completed", "completed"
                    elif code == EXIT_DIVERGED:
                        status, key = read_status(run_dir) or "diverged", "diverged"
                    elif code > 128 or code < 0 or stop["sig"]:
                        # signalled (by us or from outside), possibly before the trainer had
                        # installed its handler: a trial to resume, not a failure
                        status, key = read_status(run_dir), "interrupted"
                        if status is None or not status.startswith(("interrupted", *_FINAL)):
                            status = _mark_failed(run_dir, code, "interrupted")
                    else:
                        status, key = _mark_failed(run_dir, code), "failed"
                        status += f" (see {run_dir / 'train.log'})"
                    tally[key] += 1
                    print(f"[{done}/{len(todo)}] {t.name}: {status}"
                          f"{_final_loss(run_dir) if key == 'completed' else ''} "
                          f"({time.perf_counter() - t0:.0f}s)", flush=True)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        not_started = len(todo) - done
        print("sweep: " + ", ".join(f"{v} {k}" for k, v in tally.items() if v)
              + (f", {not_started} not started" if not_started else "")
              + f" of {len(trials)} trials", flush=True)
        if stop["sig"]:
            return exit_for_signal(stop["sig"])
        return 1 if tally["failed"] else 0
