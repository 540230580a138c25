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
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from lm.errors import ConfigError, find_disk_full

# A committed step directory that does not restore is renamed `<step>.corrupt-<n>`: kept
# for inspection (rename it back to retry it), and a name orbax does not list as a step.
CORRUPT = ".corrupt-"


class _DropOrbaxBackgroundTracebacks(logging.Filter):
    """Orbax logs a failed background save with its traceback from each thread the
    error passes through (a full disk: 17 tracebacks), then raises it again where the
    loop waits for the save, which reports it in one line (lm/train/driver.py) or raises
    it: the logged copies add nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        from_orbax = "orbax" in record.pathname.replace("\\", "/").split("/")
        carries_traceback = record.exc_info is not None or "raised an exception" in str(record.msg)
        return not (from_orbax and record.levelno >= logging.ERROR and carries_traceback)


logging.getLogger("absl").addFilter(_DropOrbaxBackgroundTracebacks())


class _DropUnretrievedDiskFull(logging.Filter):
    """The same full-disk error also reaches asyncio's "exception was never retrieved"
    log, once per array orbax was writing, when its futures are collected."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or find_disk_full(exc) is None


logging.getLogger("asyncio").addFilter(_DropUnretrievedDiskFull())


class _LoopToleratingLateResults(asyncio.SelectorEventLoop):
    """When one tensorstore operation of a restore or save fails (an unreadable
    checkpoint, a full disk), orbax ends that operation's event loop while the others
    are in flight; each of those, completing, calls back into the closed loop from a
    C++ thread, which prints a RuntimeError traceback (dozens per checkpoint). Such a
    late result has nobody waiting for it: drop it. Only a closed loop behaves
    differently from asyncio's own."""

    def call_soon_threadsafe(self, callback, *args, context=None):
        try:
            return super().call_soon_threadsafe(callback, *args, context=context)
        except RuntimeError:
            if self.is_closed():
                return None
            raise


class _OrbaxLoopPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self):
        return _LoopToleratingLateResults()


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
        batched group tries those all its trials have, lm/train/trials.py). A checkpoint that does not restore (garbled or cut
        short on disk, non-finite values) is reported in one line and, with `rename`,
        renamed aside (`<step>.corrupt-<n>`) so that no later start trips on it again.
        None intact (or only ones set aside before): ConfigError, one line."""
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

    def save(self, step: int, state, data_iterator, force: bool = False) -> bool:
        """Starts an async save when `step` is on the interval (or `force`)."""
        if self.layout is not None:
            state = self.layout.saved(state)
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator)), force=force)

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

    def restore_params(self, step: int, abstract_state):
        """Only the train state (for eval and sampling, which need no data iterator)."""
        return self._restore(step, abstract_state)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
