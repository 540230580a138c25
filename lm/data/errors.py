"""The one exception type for data problems a user can cause.

`DataError` subclasses ValueError so generic callers still catch it, but the CLI
catches it specifically, prints its message (always ONE line, naming the config
key at fault, e.g. `data.corpus: no such file or directory: /x/y`) and exits
non-zero. Bugs in lmlab itself must not raise DataError.
"""

from __future__ import annotations


class DataError(ValueError):
    """A user-caused data problem; the message is one line naming the config key."""

    def __init__(self, message: str):
        # Keep the contract "one line" even when a reason comes from an OS or
        # library error message that spans several lines.
        super().__init__(" ".join(str(message).split()))


class BadShard(DataError):
    """A file of the corpus that does not decode (data.on_bad_shard decides: fail/skip)."""

    def __init__(self, message: str, path: str = ""):
        super().__init__(message)
        self.path = path

    def __reduce__(self):  # crosses process boundaries (lm data prepare --workers)
        return BadShard, (str(self), self.path)
