"""Orbax checkpoints of the train state and the grain data iterator.

One async CheckpointManager per run: a step directory holds `state` (params, optimizer
state, step, RNG) and `data` (each process's grain iterator state), so a restart
resumes model, optimizer and data stream together. The data iterator may be an
`lm.data.Prefetcher` (a grain DatasetIterator): its state is the position after the last
batch a step consumed, not the batches its thread has read ahead. The train loop saves
only states it has verified finite.

A committed checkpoint can still be damaged on disk (a bad sector, a partial copy):
`restore_newest_intact` tries the steps newest first and takes the first that restores
and holds only finite values; the trainer renames the others `<step>.corrupt-<n>`
(kept, and no longer a step to orbax), eval and sampling only skip them.

A `layout` (lm/train/param_source.py) says what a step holds when it is not the whole state: a
LoRA run's checkpoints leave out the frozen base, which a restore rebuilds from the run's
reference to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sys
import threading
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from lm.errors import ConfigError

# A committed step directory that does not restore is renamed `<step>.corrupt-<n>`: kept
# for inspection (rename it back to retry it), and a name orbax does not list as a step.
CORRUPT = ".corrupt-"


class _DropOrbaxBackgroundTracebacks(logging.Filter):
    """Orbax logs a failed background save with its traceback from each thread the
    error passes through (a full disk: 17 tracebacks), then raises it again where the
    loop waits for the save, which reports it in one line (lm/train/driver.py) or raises
    it: the logged copies add nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        carries_traceback = record.exc_info is not None or "raised an exception" in str(record.msg)
        return not (_from_orbax(record) and record.levelno >= logging.ERROR and carries_traceback)


def _from_orbax(record: logging.LogRecord) -> bool:
    return "orbax" in record.pathname.replace("\\", "/").split("/")


_ABSL = logging.getLogger("absl")  # where orbax logs
_ABSL.addFilter(_DropOrbaxBackgroundTracebacks())


class _HeldOrbaxLogs(logging.Filter):
    """Holds what orbax logs while it is installed, to be released by the caller. Orbax
    logs what it finds wrong with a step directory (e.g. "Failed to json parse Metadata
    file: <path>, file content: <all of it>" when it lists the steps): for a step that
    then does not restore, the one line saying so (Checkpointer.restore_newest_intact)
    is the report, and orbax's lines are dropped; the others are logged as they were."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if not _from_orbax(record):
            return True
        with self._lock:
            self.records.append(record)
        return False

    @contextlib.contextmanager
    def installed(self):
        _ABSL.addFilter(self)
        try:
            yield self
        finally:
            _ABSL.removeFilter(self)

    def release(self, dropping: Collection[Path] = ()) -> None:
        """Logs the records held, except those that name one of the `dropping` paths."""
        with self._lock:
            records, self.records = self.records, []
        # A step directory's path, not the start of another one's (12 in 120).
        named = re.compile("|".join(re.escape(str(p)) + r"(?![0-9])" for p in dropping))
        for record in records:
            if not (dropping and named.search(record.getMessage())):
                _ABSL.handle(record)


class _LoopFinishingItsTasks(asyncio.SelectorEventLoop):
    """Orbax runs each restore, and each background save, in a fresh event loop that it
    closes as soon as the coroutine it awaits returns or raises. When one array of a
    checkpoint fails to read (or to write), `asyncio.gather` raises at once while the
    other arrays' reads are still in flight (about a hundred for the default model),
    and the loop is closed under them: those that fail as well are never retrieved
    ("Task exception was never retrieved", logged when they are collected, one
    traceback each), those still pending are left to be destroyed unfinished, and each
    tensorstore read that completes later calls back into the closed loop from its own
    thread ("Event loop is closed", one traceback each): hundreds of lines after the one
    line that says what happened. This loop ends as `asyncio.run` ends one: before
    closing, it cancels the tasks still running and runs until they have finished, so
    that every error is consumed in the loop; a read cancelled so may still deliver its
    result from tensorstore's thread after the close, and that result, which nobody
    awaits any more, is dropped. Otherwise it is asyncio's own loop."""

    def close(self) -> None:
        # (Not when another loop runs in this thread: a loop collected unclosed is
        # closed by its __del__, wherever the collection happens.)
        if not (self.is_closed() or self.is_running() or asyncio._get_running_loop()):
            pending = [t for t in asyncio.all_tasks(self) if not t.done()]
            for task in pending:
                task.cancel()
            # Also runs the callbacks already due (gather retrieving a sibling's error).
            self.run_until_complete(_settle(pending))
        super().close()

    def call_soon_threadsafe(self, callback, *args, context=None):
        try:
            return super().call_soon_threadsafe(callback, *args, context=context)
        except RuntimeError:
            if self.is_closed():
                return None
            raise


async def _settle(tasks) -> None:
    await asyncio.gather(*tasks, return_exceptions=True)


class _OrbaxLoopPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self):
        return _LoopFinishingItsTasks()


# Orbax makes a fresh loop (asyncio.new_event_loop) for every restore and in each of
# its background save threads: the policy is what reaches them. Set for the process
# (asyncio's policy is process-wide), unless someone chose another one.
if type(asyncio.get_event_loop_policy()) is asyncio.DefaultEventLoopPolicy:
    asyncio.set_event_loop_policy(_OrbaxLoopPolicy())


class CheckpointUnreadable(Exception):
    """A committed checkpoint restored to something no train loop saved."""


def failure_reason(e: BaseException) -> str:
    """One short line for why a checkpoint did not restore: tensorstore's messages run to
    kilobytes (specs in brackets) and name the root cause last."""
    text = str(e).split(" [tensorstore_spec", 1)[0].strip()
    text = (text.splitlines() or [""])[0]
    if len(text) > 200:  # the status code (e.g. DATA_LOSS) and the root cause
        head = text.split(":", 1)[0]
        text = (head[:40] + ": ..." if head != text else "...") + text[-160:]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def check_finite(state, step: int) -> None:
    """The loop saves only states it verified finite (lm/train/driver.py), so a non-finite
    value read back is damage on disk that the file format did not catch."""
    if not bool(_all_finite(state)):
        raise CheckpointUnreadable(f"step {step} holds non-finite values")


class Checkpointer:
    def __init__(self, directory: Path, every: int, keep: int, layout=None):
        self.layout = layout  # None: a step holds the whole state
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=every, enable_async_checkpointing=True)
        self.directory = Path(directory).absolute()
        # What orbax logs while listing the steps is held until restore_newest_intact
        # knows which of them are unreadable (its one line then says so) or close.
        self._held_logs = _HeldOrbaxLogs()
        with self._held_logs.installed():
            self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def committed_steps(self) -> list[int]:
        """The steps committed on disk, read afresh (orbax's own list is its cache)."""
        if not self.directory.is_dir():
            return []
        return sorted(int(p.name) for p in self.directory.iterdir()
                      if p.name.isdigit() and p.is_dir())

    def set_aside(self) -> list[Path]:
        """The unreadable checkpoints renamed aside by earlier runs."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if CORRUPT in p.name)

    def _rename_aside(self, step: int) -> Path:
        src = self.directory / str(step)
        n = 1
        while (dst := self.directory / f"{step}{CORRUPT}{n}").exists():
            n += 1
        src.rename(dst)
        self.manager.reload()
        return dst

    def restore_newest_intact(self, read: Callable[[int], Any], *, rename: bool,
                              log=None, steps=None) -> tuple[int, Any] | None:
        """(step, read(step)) of the newest checkpoint that restores, newest first; None
        when there is none at all. `steps`: the steps to try (default: every one; a
        batched group tries those all its trials have, lm/train/trials.py). A checkpoint
        that does not restore (garbled or cut short on disk, non-finite values) is
        reported in one line and, with `rename`,
        renamed aside (`<step>.corrupt-<n>`) so that no later start trips on it again.
        None intact (or only ones set aside before): ConfigError, one line."""
        unreadable: list[Path] = []  # what orbax logs about these is left out
        try:
            with self._held_logs.installed():
                return self._restore_newest_intact(read, rename, log, steps, unreadable)
        finally:
            self._held_logs.release(dropping=unreadable)

    def _restore_newest_intact(self, read, rename: bool, log, steps, unreadable: list[Path]):
        log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        failed, warnings = [], []  # the warnings are printed only if one restores
        earlier = self.set_aside()
        steps = sorted(self.manager.all_steps() if steps is None else steps, reverse=True)
        for step in steps:
            try:
                value = read(step)
            except (KeyboardInterrupt, SystemExit, ConfigError):
                raise  # ConfigError: the user's setup (e.g. a LoRA base gone), not damage
            except Exception as e:  # noqa: BLE001 (any failure to read it back)
                reason = failure_reason(e)
                unreadable.append(self.directory / str(step))
            else:
                for line in warnings:
                    log(f"{line}; using step {step}")
                if failed and rename and jax.process_count() > 1:
                    # Process 0 renamed them: every process forgets them (orbax would
                    # refuse to save those steps again as "already existing").
                    from jax.experimental import multihost_utils
                    multihost_utils.sync_global_devices("lmlab: unreadable checkpoints set aside")
                    self.manager.reload()
                return step, value
            aside = ""
            if rename and jax.process_index() == 0:
                aside = f" (renamed to {self._rename_aside(step).name})"
            failed.append(f"{step}{aside}: {reason}")
            warnings.append(f"warning: checkpoint {self.directory / str(step)} is unreadable"
                            f"{aside}: {reason}")
        if failed or earlier:
            names = ", ".join(p.name for p in earlier) or "none"
            raise ConfigError(
                f"no intact checkpoint in {self.directory}: unreadable "
                f"{'; '.join(failed) or 'none new'}; set aside before: {names}; rename one "
                f"back to retry it, or move the checkpoints away to start the run afresh")
        return None

    def save(self, step: int, state, data_iterator, force: bool = False,
             extra=None) -> bool:
        """Starts an async save when `step` is on the interval (or `force`). `extra`: a
        pytree a run keeps beside its train state (`lm rl`: the next rollout batch, the
        lagged params, the reference), in an item of its own, so that every reader of
        the state (eval, sample, export, --init-from) reads an ordinary checkpoint."""
        if self.layout is not None:
            state = self.layout.saved(state)
        items = dict(state=ocp.args.StandardSave(state),
                     data=grain.checkpoint.CheckpointSave(data_iterator))
        if extra is not None:
            items["extra"] = ocp.args.StandardSave(extra)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def _restore(self, step: int, abstract_state, **items):
        complete = None
        if self.layout is not None:
            abstract_state, complete = self.layout.reading(self.directory / str(step),
                                                           abstract_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), **items))
        check_finite(restored["state"], step)
        return restored["state"] if complete is None else complete(restored["state"])

    def restore(self, step: int, abstract_state, data_iterator):
        """Returns the state; the data iterator is restored in place."""
        return self._restore(step, abstract_state,
                             data=grain.checkpoint.CheckpointRestore(data_iterator))

    def restore_with_extra(self, step: int, abstract_state, data_iterator, abstract_extra):
        """(state, extra) of a checkpoint saved with `extra` (see save); the data
        iterator restored in place."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iterator),
            extra=ocp.args.StandardRestore(abstract_extra)))
        check_finite(restored["state"], step)
        return restored["state"], restored["extra"]

    def restore_params(self, step: int, abstract_state):
        """Only the train state (for eval and sampling, which need no data iterator)."""
        return self._restore(step, abstract_state)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self._held_logs.release()
        self.manager.wait_until_finished()
        self.manager.close()
