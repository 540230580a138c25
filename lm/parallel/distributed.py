"""Multi-process start-up: `initialize_from_env()` joins the process to a pod.

Called once at the top of `lm` before any command touches JAX. Which pod, if any, is
read from the environment (`detect`), in this order:

1. `LMLAB_DISTRIBUTED=off`: single process, whatever else is set.
2. `LMLAB_COORDINATOR` (host:port), `LMLAB_NUM_PROCESSES`, `LMLAB_PROCESS_ID`: set by
   `lm launch local` or by hand -> `jax.distributed.initialize(...)` with those values
   (on CPU with gloo collectives).
3. `LMLAB_DISTRIBUTED=auto`: `jax.distributed.initialize()` with JAX's own cluster
   detection (`lm launch tpu` sets it on every worker).
4. SLURM with more than one task (`srun`): `jax.distributed.initialize()`.
5. Cloud TPU multi-host (`TPU_WORKER_HOSTNAMES` with more than one host) or multislice
   (`MEGASCALE_*`): `jax.distributed.initialize()`.
6. Otherwise nothing: a single process.

Also read: `LMLAB_LOCAL_DEVICES=0,1,..` (the local devices this process uses; e.g. one
SLURM task per node driving all of its GPUs), `LMLAB_HEARTBEAT_TIMEOUT` (s, default 10:
how soon a dead peer is noticed), `LMLAB_INIT_TIMEOUT` (s, default 120: how long to wait
for every process to join), `LMLAB_SHUTDOWN_TIMEOUT` (s, default 60), and
`LMLAB_FAULT_PROCESS=K`: `LMLAB_FAULT` (fault injection, lm/train/driver.py) applies only
to process K; the others drop it.

A process of a pod that loses another (killed, its host gone; with or without `lm launch`)
exits EXIT_POD_PEER_LOST (5) with one line naming the lost process and where a rerun
resumes, whichever notices first: a failed cross-process collective (gloo on CPU:
"Connection reset by peer"), caught by the train loop (`lost_peer`, which leaves with
os._exit: an orderly exit would wait for the dead peer at JAX's shutdown barrier), or
the coordination client's error poll, whose abort the process's guard turns into the
same line (lm/parallel/guard.py).
"""

from __future__ import annotations

import os
import re
import sys
from typing import Callable, Mapping, NoReturn

from lm.errors import ConfigError
from lm.errors import EXIT_POD_PEER_LOST

EXPLICIT = ("LMLAB_COORDINATOR", "LMLAB_NUM_PROCESSES", "LMLAB_PROCESS_ID")


def _int(environ: Mapping[str, str], key: str, default: int | None = None,
         minimum: int = 0) -> int:
    raw = environ.get(key, "")
    if raw.strip() == "" and default is not None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{key}={raw!r} is not an integer") from None
    if value < minimum:
        raise ConfigError(f"{key}={value} must be >= {minimum}")
    return value


def _timeouts(environ: Mapping[str, str]) -> dict:
    return {"heartbeat_timeout_seconds": _int(environ, "LMLAB_HEARTBEAT_TIMEOUT", 10, 1),
            "initialization_timeout": _int(environ, "LMLAB_INIT_TIMEOUT", 120, 1),
            "shutdown_timeout_seconds": _int(environ, "LMLAB_SHUTDOWN_TIMEOUT", 60, 1)}


def _local_devices(environ: Mapping[str, str]) -> list[int] | None:
    raw = environ.get("LMLAB_LOCAL_DEVICES", "").strip()
    if not raw:
        return None
    try:
        ids = [int(x) for x in raw.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"LMLAB_LOCAL_DEVICES={raw!r} must be comma-separated integers") from None
    if not ids or min(ids) < 0:
        raise ConfigError(f"LMLAB_LOCAL_DEVICES={raw!r} must list device ids >= 0")
    return ids


def detect(environ: Mapping[str, str]) -> dict | None:
    """How this process joins a pod, from an environment; None = single process.

    Returns {"kind": "explicit" | "auto" | "slurm" | "tpu", "kwargs": {...}} where
    kwargs are the arguments for jax.distributed.initialize. Pure: touches no JAX.
    Raises ConfigError on malformed values."""
    mode = environ.get("LMLAB_DISTRIBUTED", "").strip().lower()
    if mode not in ("", "auto", "off"):
        raise ConfigError(f"LMLAB_DISTRIBUTED={mode!r} must be 'auto' or 'off'")
    if mode == "off":
        return None
    common = _timeouts(environ)
    local = _local_devices(environ)
    if local is not None:
        common["local_device_ids"] = local

    present = [k for k in EXPLICIT if environ.get(k, "").strip()]
    if present:
        missing = [k for k in EXPLICIT if k not in present]
        if missing:
            raise ConfigError(f"{', '.join(present)} set but {', '.join(missing)} missing "
                              "(set all three, or none)")
        coordinator = environ["LMLAB_COORDINATOR"].strip()
        host, sep, port = coordinator.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"LMLAB_COORDINATOR={coordinator!r} must be host:port")
        num = _int(environ, "LMLAB_NUM_PROCESSES", minimum=1)
        pid = _int(environ, "LMLAB_PROCESS_ID", minimum=0)
        if pid >= num:
            raise ConfigError(f"LMLAB_PROCESS_ID={pid} must be < LMLAB_NUM_PROCESSES={num}")
        return {"kind": "explicit", "kwargs": {
            "coordinator_address": coordinator, "num_processes": num, "process_id": pid,
            **common}}

    if mode == "auto":
        return {"kind": "auto", "kwargs": common}

    if environ.get("SLURM_JOB_ID") and environ.get("SLURM_NTASKS"):
        ntasks = _int(environ, "SLURM_NTASKS", minimum=1)
        if ntasks > 1:
            if not environ.get("SLURM_PROCID"):
                raise ConfigError(f"SLURM_NTASKS={ntasks} but no SLURM_PROCID: start each "
                                  "task with srun")
            return {"kind": "slurm", "kwargs": common}

    hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    multislice = any(k.startswith("MEGASCALE_") and environ[k].strip() for k in environ)
    if len(hosts) > 1 or multislice:
        return {"kind": "tpu", "kwargs": common}
    return None


def coordination_client():
    """The jax.distributed client (host-side key-value store and barriers), or None."""
    try:
        from jax._src import distributed
        return distributed.global_state.client
    except (ImportError, AttributeError):
        return None


def _apply_fault_target(process_id: int) -> None:
    target = os.environ.get("LMLAB_FAULT_PROCESS", "").strip()
    if not target:
        return
    if _int(os.environ, "LMLAB_FAULT_PROCESS") != process_id:
        os.environ.pop("LMLAB_FAULT", None)


# What the pod's loss of a process should say and record, set while a command runs
# (lm/train/driver.py: where a rerun resumes, summary.json); and the code of an exit under
# way (a process leaving on its own is not a peer lost).
_loss: dict = {"report": None, "exiting": None}


def on_peer_lost(report: Callable[[str], str] | None) -> None:
    """`report(lost)` (lost: e.g. "process 1") records the failure and returns what to
    add to the one line, e.g. "rerun resumes from step 8"; None: nothing to add."""
    _loss["report"] = report


def exiting(code: int) -> None:
    """This process is leaving with `code`: a peer that leaves too is no news."""
    _loss["exiting"] = code


def lost_peer(detail: str) -> NoReturn:
    """Leave now, with one line: which process the pod lost, and where a rerun resumes."""
    code = _loss["exiting"]
    if code is not None:
        os._exit(code)
    import jax

    from lm.parallel.guard import which_lost
    lost = which_lost(detail, jax.process_index(), jax.process_count())
    extra = ""
    if _loss["report"] is not None:
        try:
            extra = _loss["report"](lost)
        except Exception:  # noqa: BLE001 (the line matters more than the record)
            extra = ""
    sys.stdout.flush()
    sys.stderr.flush()
    # One write(2) of the whole line: a native thread (the coordination service's log)
    # may write to the same fd meanwhile, and a line split across writes (print's text,
    # then its newline, when stderr is unbuffered) can get its log line glued on.
    line = f"error: the pod lost {lost}" + (f"; {extra}" if extra else "") + "\n"
    os.write(2, line.encode())
    os._exit(EXIT_POD_PEER_LOST)


def is_lost_peer_error(e: BaseException) -> bool:
    """A failed collective or coordination call because a peer process is gone: gloo's
    connection to it reset or closed, or the coordination service's verdict (a task
    stopped sending heartbeats) reaching a barrier."""
    if type(e).__name__ not in ("JaxRuntimeError", "XlaRuntimeError"):
        return False
    text = str(e)
    gloo = re.search(r"gloo", text, re.I) and re.search(
        r"connection (reset|closed|refused)|peer|broken pipe", text, re.I)
    service = re.search(r"heartbeat timeout|stopped sending heartbeats|tasks have crashed",
                        text, re.I)
    return bool(gloo or service)


def initialize_from_env() -> None:
    """Join the pod described by the environment (see the module docstring); no-op
    for a single process. Raises ConfigError on malformed settings."""
    spec = detect(os.environ)
    if spec is None:
        _apply_fault_target(0)
        return
    import jax

    kwargs = dict(spec["kwargs"])
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if spec["kind"] == "explicit" and (platforms == "" or platforms.startswith("cpu")):
        # Cross-process collectives on CPU devices need a collectives backend.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    from lm.parallel.guard import tell
    tell(process=jax.process_index(), processes=jax.process_count())
    _apply_fault_target(jax.process_index())
