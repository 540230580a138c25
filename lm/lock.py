"""One writer per directory: a run directory (`lm train`), a sweep workdir (`lm sweep`).

The writer holds an exclusive flock(2) on `<dir>/.lock` while it runs. The kernel drops
the lock when the process ends, however it ends (kill -9 included), so a crash never
leaves a stale lock to clean up; the file's content (pid, host, command) only names the
holder in the refusal. The file itself is never deleted: a writer that unlinked it could
let two others lock two different files of the same name. On NFS (v4, or v3 with its
lock manager) Linux carries flock as a lock the server holds, so a second writer on
another host is refused too.

A pod's processes share one run directory, on a shared filesystem or each a copy on its
own host: only process 0 takes the lock (were each to take it on a shared filesystem,
process 0 would refuse its own peers), and the others learn its outcome through the
coordination service, so every process of a refused pod exits 2 with the same line.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from lm.errors import ConfigError

LOCK_FILE = ".lock"
POD_LOCK_TIMEOUT_MS = 30 * 60 * 1000  # process 0 may reach the lock long after the others

_pod_locks = itertools.count()  # one key per pod-wide lock taken (the same on every process)


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "another process (it has not written its name yet)"


@contextlib.contextmanager
def hold(directory: str | Path, command: str) -> Iterator[None]:
    """Hold `directory` (created if missing) for this `command`, e.g. "lm train", for the
    duration of the block; another holder: ConfigError naming it (pid, host)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise
            raise ConfigError(f"{directory} is in use by {_holder(fd)}; one {command} at a "
                              "time per directory: wait for it to end or use another "
                              "directory") from None
        try:  # who holds it, for the refusal; best effort (the disk may be full)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()} "
                          f"({command})\n".encode(), 0)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def hold_for_pod(directory: str | Path, command: str) -> Iterator[None]:
    """`hold` by process 0 of a pod, its outcome shared with every process (one process:
    `hold`)."""
    import jax

    if jax.process_count() == 1:
        with hold(directory, command):
            yield
        return
    from lm.parallel.distributed import coordination_client

    client = coordination_client()
    key = f"lmlab/lock/{next(_pod_locks)}"
    if jax.process_index() != 0:
        refusal = client.blocking_key_value_get(key, POD_LOCK_TIMEOUT_MS)
        if refusal:
            raise ConfigError(refusal)
        yield
        return
    published = False
    try:
        with hold(directory, command):
            client.key_value_set(key, "")
            published = True
            yield
    except BaseException as e:  # the others must not wait for a lock never taken
        if not published:
            client.key_value_set(key, str(e) if isinstance(e, ConfigError) else
                                 f"process 0 could not lock {directory}: {e}")
        raise
