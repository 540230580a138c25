"""User-caused errors and the exit codes of `lm` commands, defined once.

`ConfigError` (a bad config key, value or run directory) and `lm.data.DataError`
(missing, empty or unreadable data) carry ONE line naming what is at fault; the CLI
prints it and exits EXIT_USER_ERROR before anything is written. A full disk anywhere
(`find_disk_full` recognises it however it was raised) is one line and EXIT_DISK_FULL;
a pod's lost peer is one line and EXIT_POD_PEER_LOST (lm/parallel/distributed.py,
lm/parallel/guard.py). Bugs in lmlab itself raise other exceptions. The README's "When
things go wrong" says what each code means to a user.
"""

from __future__ import annotations

import errno
import re

EXIT_OK = 0
EXIT_FAILED = 1  # an unexpected error (a bug in lmlab, or a failure not classified below)
EXIT_USER_ERROR = 2  # bad config, data, run directory (incl. held by another writer, no
#                      intact checkpoint) or command line
EXIT_DIVERGED = 3  # a non-finite loss stopped training; the last good checkpoint is kept
EXIT_DISK_FULL = 4  # no space left on a device being written; earlier checkpoints kept
EXIT_POD_PEER_LOST = 5  # a pod lost one of its processes; rerun resumes from a checkpoint


def exit_for_signal(signum: int) -> int:
    """Stopped by a signal after a final checkpoint: the shell's 128 + signal number."""
    return 128 + int(signum)


class ConfigError(ValueError):
    """A user-caused configuration problem; the message is one line naming the key."""


class DiskFull(OSError):
    """No space left on the device holding `path`: what was being written is lost, what
    was written before is not."""

    def __init__(self, path: str, then: str = ""):
        super().__init__(errno.ENOSPC, "no space left on device", path)
        self.path, self.then = path, then  # then: what survives, how to go on

    def __str__(self) -> str:
        return f"no space left on device writing {self.path}" + (f"; {self.then}" if self.then else "")


_NO_SPACE = "No space left on device"
_QUOTED_PATH = re.compile(r'"(/[^"]+)"')


def find_disk_full(e: BaseException | None, default_path: str = "?") -> DiskFull | None:
    """The ENOSPC behind `e`, wherever it is: an OSError, or the message of a
    tensorstore / orbax error from a background write (`RESOURCE_EXHAUSTED ... Failed
    writing: "<path>" ... No space left on device`), raised directly, as the cause or
    context of another, or inside an exception group. None: not a full disk."""
    seen = set()
    stack = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, DiskFull):
            return x
        if isinstance(x, OSError) and x.errno == errno.ENOSPC:
            return DiskFull(str(x.filename or default_path))
        text = str(x)
        if _NO_SPACE in text or "os_error_code='28'" in text:
            before = text.split(_NO_SPACE, 1)[0]
            paths = _QUOTED_PATH.findall(before) or _QUOTED_PATH.findall(text)
            return DiskFull(paths[-1] if paths else default_path)
        stack += [x.__cause__, x.__context__, *getattr(x, "exceptions", ())]
    return None
