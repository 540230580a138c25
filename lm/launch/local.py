"""`lm launch local`: a pod of P processes on this machine, D simulated CPU devices each.

Each process runs `python -m lm.cli <command>` with LMLAB_COORDINATOR / LMLAB_NUM_PROCESSES
/ LMLAB_PROCESS_ID set (lm/parallel/distributed.py joins them); their output is streamed
with a `[pK] ` prefix. If a process exits non-zero (or is killed), the others are sent
SIGTERM, then SIGKILL after a grace period, and the launcher exits non-zero with one
line naming the process. SIGINT / SIGTERM to the launcher are forwarded to every process
(so training checkpoints) and the launcher waits for them; a second one kills them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

from lm.config import ConfigError

DEVICE_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(base: dict, index: int, processes: int, devices: int, port: int) -> dict:
    env = dict(base)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_FLAG)]
    env["XLA_FLAGS"] = " ".join(flags + [f"{DEVICE_FLAG}={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["LMLAB_COORDINATOR"] = f"127.0.0.1:{port}"
    env["LMLAB_NUM_PROCESSES"] = str(processes)
    env["LMLAB_PROCESS_ID"] = str(index)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("LMLAB_DISTRIBUTED", None)
    return env


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"{code} ({signal.Signals(-code).name})"
        except ValueError:
            pass
    return str(code)


def _exit_code(code: int) -> int:
    return 128 - code if code < 0 else code


class _Pod:
    def __init__(self, argvs: list[list[str]], envs: list[dict]):
        self.lock = threading.Lock()
        self.procs: list[subprocess.Popen] = []
        self.threads: list[threading.Thread] = []
        for i, (argv, env) in enumerate(zip(argvs, envs)):
            # Own session: a terminal's Ctrl-C reaches the launcher only, which forwards it.
            p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
            self.procs.append(p)
            for stream, sink in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
                t = threading.Thread(target=self._pump, args=(stream, sink, f"[p{i}] "),
                                     daemon=True)
                t.start()
                self.threads.append(t)

    def _pump(self, stream, sink, prefix: str) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self.lock:
                sink.write(prefix + line + "\n")
                sink.flush()
        stream.close()

    def signal(self, sig: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass

    def say(self, msg: str) -> None:
        with self.lock:
            print(msg, file=sys.stderr, flush=True)


def run_local(processes: int, devices_per_process: int, command: list[str],
              port: int | None = None, grace_s: float | None = None,
              stop_timeout_s: float | None = None) -> int:
    if processes < 1:
        raise ConfigError(f"--processes must be >= 1, got {processes}")
    if devices_per_process < 1:
        raise ConfigError(f"--devices-per-process must be >= 1, got {devices_per_process}")
    if port is not None and not 0 < port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {port}")
    if not command:
        raise ConfigError("lm launch local: no command after --")
    grace_s = float(os.environ.get("LMLAB_LAUNCH_GRACE", 5)) if grace_s is None else grace_s
    if stop_timeout_s is None:
        stop_timeout_s = float(os.environ.get("LMLAB_LAUNCH_STOP_TIMEOUT", 300))
    port = port or free_port()
    argv = [sys.executable, "-m", "lm.cli", *command]
    envs = [child_env(os.environ, i, processes, devices_per_process, port)
            for i in range(processes)]
    pod = _Pod([argv] * processes, envs)

    state = {"signum": 0, "kill_at": None}

    def on_signal(signum, frame):
        if state["signum"]:  # second signal: stop now
            pod.say(f"lm launch: signal {signum} again; killing the processes")
            pod.signal(signal.SIGKILL)
            return
        state["signum"] = signum
        state["kill_at"] = time.monotonic() + stop_timeout_s
        pod.say(f"lm launch: signal {signum}; forwarded to the processes, waiting for them")
        pod.signal(signum)

    old = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, on_signal)
    failure = None  # (index, code) of the first process that failed
    try:
        while any(p.poll() is None for p in pod.procs):
            if failure is None and not state["signum"]:
                for i, p in enumerate(pod.procs):
                    code = p.poll()
                    if code not in (None, 0):
                        failure = (i, code)
                        pod.signal(signal.SIGTERM)
                        state["kill_at"] = time.monotonic() + grace_s
                        break
            if state["kill_at"] is not None and time.monotonic() > state["kill_at"]:
                pod.signal(signal.SIGKILL)
                state["kill_at"] = None
            time.sleep(0.05)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if any(p.poll() is None for p in pod.procs):  # an exception in the launcher
            pod.signal(signal.SIGKILL)
            for p in pod.procs:
                p.wait()
        for t in pod.threads:
            t.join(timeout=5)

    codes = [p.returncode for p in pod.procs]
    if failure is None and not state["signum"]:
        bad = [(i, c) for i, c in enumerate(codes) if c != 0]
        failure = bad[0] if bad else None
    if failure is not None and not state["signum"]:
        i, code = failure
        others = " the other processes" if processes > 1 else ""
        pod.say(f"lm launch: process {i} exited with code {_describe(code)}; "
                f"stopped{others or ' the pod'}")
        return _exit_code(code) or 1
    if state["signum"]:
        bad = [c for c in codes if c != 0]
        return _exit_code(bad[0]) if bad else 0
    return 0
