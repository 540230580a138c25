"""User-caused errors and the exit codes of `lm` commands, defined once.

`ConfigError` (a bad config key, value or run directory) and `lm.data.DataError`
(missing, empty or unreadable data) carry ONE line naming what is at fault; the CLI
prints it and exits EXIT_USER_ERROR before anything is written. Bugs in lmlab itself
raise other exceptions.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_USER_ERROR = 2  # bad config, data, run directory or command line
EXIT_DIVERGED = 3  # a non-finite loss stopped training; the last good checkpoint is kept


def exit_for_signal(signum: int) -> int:
    """Stopped by a signal after a final checkpoint: the shell's 128 + signal number."""
    return 128 + int(signum)


class ConfigError(ValueError):
    """A user-caused configuration problem; the message is one line naming the key."""
