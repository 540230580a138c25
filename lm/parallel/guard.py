"""A pod process that loses a peer ends with one line and EXIT_POD_PEER_LOST (5).

When a process of a pod dies (kill -9, its host gone), JAX's coordination client in each
survivor aborts the process from its error-polling thread: a fatal absl log line, a
native stack dump, SIGABRT. JAX offers no hook that runs instead (the client's
`missed_heartbeat_callback` cannot be handed the error status from Python), so every
process of a pod (`lm` under LMLAB_COORDINATOR, SLURM, a TPU pod; with or without `lm
launch`) runs its command in a child, and this parent, which imports nothing heavy:

- relays the child's stdout untouched and its stderr line by line, holding back the
  coordination service's native log lines until it knows whether they end in that abort
  (then they are dropped: they are the peer's death told at length) or not (then they
  are printed as they came);
- turns the abort into one line, `error: the pod lost process K; rerun resumes from step
  N` (N: the newest committed checkpoint of the run dir the child named), records it in
  summary.json when this is process 0, and exits 5;
- otherwise exits as the child did (the same code, or the same signal).

The child catches a failed collective first when it can (gloo: "Connection reset by
peer", lm/train/driver.py) and says the same itself (lm/parallel/distributed.py
`lost_peer`); then the parent adds nothing. Signals: the parent forwards SIGTERM and
SIGINT to the child (which checkpoints and stops); a launcher that signals the process
group reaches both, and the child's stop flag takes a repeated signal as one.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from lm.errors import EXIT_POD_PEER_LOST

GUARDED = "LMLAB_GUARDED"  # set in the child (to the guard's pid): it runs the command
_CONTEXT = "\x1flmlab-guard "  # a line from the child for this parent only
_LOST = "error: the pod lost "
# The abort, and the native log lines of the coordination machinery that precede it.
_FATAL = re.compile(r"JAX distributed service detected fatal errors|Check failure stack trace")
_NATIVE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ (?P<file>[\w.]+):\d+\] ")
_COORDINATION_FILES = ("preemption_sync_manager.cc", "coordination_service_agent.cc",
                       "coordination_service.cc", "client.h", "client.cc")


def die_with_parent() -> None:
    """In the child: a kill -9 of the guard (the process the user or scheduler sees)
    kills the child too, as it would have killed an unguarded process (Linux:
    PR_SET_PDEATHSIG; elsewhere the child notices at its next peer failure)."""
    parent = int(os.environ.get(GUARDED, "0") or 0)
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if parent and os.getppid() != parent:  # the guard died before prctl took effect
        os._exit(128 + int(signal.SIGKILL))


def tell(**context) -> None:
    """From the child: what the parent needs if this process aborts (its process index
    and count, the run dir). A no-op in an unguarded process."""
    if os.environ.get(GUARDED):
        print(_CONTEXT + json.dumps(context), file=sys.stderr, flush=True)


def which_lost(detail: str, me: int | None, n: int | None) -> str:
    task = re.search(r"task:(\d+)|[Tt]ask (\d+) heartbeat|stopped sending heartbeats\):\s*(\d+)",
                     detail)
    named = int(next(g for g in task.groups() if g is not None)) if task else None
    if named is not None and named != me:
        k = named
    elif me not in (None, 0) and re.search(r"UNAVAILABLE|Socket closed|coordination", detail):
        k = 0  # the coordination service lives in process 0: it is gone
    elif me is not None and n == 2:
        k = 1 - me
    else:
        return "another process"
    return f"process {k}" + (" (the coordinator)" if k == 0 else "")


def resume_hint(run_dir: str | None) -> str:
    """Where a rerun of the run in `run_dir` resumes: its newest committed checkpoint."""
    if not run_dir:
        return "rerun the command to resume from the last checkpoint"
    checkpoints = Path(run_dir) / "checkpoints"
    steps = [int(p.name) for p in checkpoints.iterdir()
             if p.name.isdigit() and p.is_dir()] if checkpoints.is_dir() else []
    return (f"rerun resumes from step {max(steps)}" if steps
            else "no checkpoint yet: a rerun starts afresh")


def record_in_summary(run_dir: str | None, status: str) -> None:
    """summary.json's status, where the run has one and it can be written."""
    if not run_dir:
        return
    path = Path(run_dir) / "summary.json"
    try:
        summary = json.loads(path.read_text())
        if not isinstance(summary, dict) or summary.get("status") != "running":
            return  # finished before, or not this run's to change
        summary["status"] = status
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(path)
    except (OSError, ValueError):
        pass


class _Relay:
    """The child's stderr, line by line, holding back coordination log lines (and what
    follows them) until the next ordinary line says they were not an abort's prelude."""

    def __init__(self, stream, sink):
        self.stream, self.sink = stream, sink
        self.context: dict = {}
        self.held: list[str] = []
        self.fatal = ""  # the text of the abort, once seen
        self.said_lost = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _emit(self, lines) -> None:
        self.sink.write("".join(lines))
        self.sink.flush()

    def _run(self) -> None:
        for raw in iter(self.stream.readline, b""):
            line = raw.decode("utf-8", "replace")
            if line.startswith(_CONTEXT):
                try:
                    self.context.update(json.loads(line[len(_CONTEXT):]))
                except ValueError:
                    pass
                continue
            if self.fatal and not line.startswith(_LOST):
                self.fatal += line  # the stack dump: dropped
                continue
            if _FATAL.search(line):
                self.fatal = "".join(self.held) + line
                self.held = []
                continue
            native = _NATIVE.match(line)
            if native and native.group("file") in _COORDINATION_FILES:
                self.held.append(line)
                continue
            if self.held and not native and not line.startswith(("Traceback", "error: ",
                                                                 "warning: ")):
                self.held.append(line)  # a continuation of a held message
                continue
            if line.startswith(_LOST):  # the child's own account won the race to exit
                self.said_lost = True
                self.held = []
            self._emit([*self.held, line])
            self.held = []
        self.stream.close()

    def finish(self, aborted: bool) -> None:
        self.thread.join(timeout=10)
        if self.held and not aborted:
            self._emit(self.held)


def run_guarded(argv: list[str]) -> int:
    """Run `lm ARGV` in a child process as described above; its exit code."""
    env = dict(os.environ, **{GUARDED: str(os.getpid())})
    child = subprocess.Popen([sys.executable, "-m", "lm.cli", *argv], env=env,
                             stderr=subprocess.PIPE)
    relay = _Relay(child.stderr, sys.stderr)

    def forward(signum, frame):
        if child.poll() is None:
            child.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                code = child.wait()
                break
            except InterruptedError:  # pragma: no cover (PEP 475 retries)
                continue
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    aborted = code == -signal.SIGABRT
    relay.finish(aborted)
    if relay.said_lost and code in (EXIT_POD_PEER_LOST, -signal.SIGABRT):
        return EXIT_POD_PEER_LOST  # the child said it (then its abort may have won the race)
    if aborted and relay.fatal:
        ctx = relay.context
        lost = which_lost(relay.fatal, ctx.get("process"), ctx.get("processes"))
        if ctx.get("process") == 0:
            record_in_summary(ctx.get("run_dir"), f"failed: the pod lost {lost}")
        sys.stdout.flush()
        print(f"{_LOST}{lost}; {resume_hint(ctx.get('run_dir'))}", file=sys.stderr,
              flush=True)
        return EXIT_POD_PEER_LOST
    if code < 0:  # die the same way, for whoever watches this process (a launcher)
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            signal.signal(-code, signal.SIG_DFL)
        except (OSError, ValueError):  # SIGKILL, SIGSTOP: always the default
            pass
        os.kill(os.getpid(), -code)
        return 128 - code
    return code
