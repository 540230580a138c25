"""The event loops orbax runs its restores and saves in (lm/train/checkpoint.py): a
restore that fails on one array leaves nothing behind it to print tracebacks later."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import threading
import time
import warnings

import pytest

import lm.train.checkpoint  # noqa: F401 (sets the event loop policy orbax's loops get)


def _a_failed_restore(mode: str) -> list[str]:
    """What orbax's run_sync does with a restore whose first array read fails: one fresh
    loop, `asyncio.gather` over the reads, the loop closed as soon as gather raises.
    `steps`: the other reads fail a few loop iterations later; `thread`: they complete
    on another thread (as tensorstore's do) after the loop was closed. Returns the
    errors the late completions met."""
    late = []

    async def read(i: int):
        if i == 0:
            raise ValueError("DATA_LOSS: array 0")
        if mode == "steps":
            for _ in range(i):
                await asyncio.sleep(0)
            raise ValueError(f"DATA_LOSS: array {i}")
        loop, result = asyncio.get_running_loop(), asyncio.get_running_loop().create_future()

        def complete():
            time.sleep(0.1)
            try:
                loop.call_soon_threadsafe(
                    lambda: result.done() or result.set_exception(ValueError(f"array {i}")))
            except RuntimeError as e:  # asyncio's loop: "Event loop is closed"
                late.append(repr(e))
        threading.Thread(target=complete).start()
        await result

    async def restore():
        await asyncio.gather(*(read(i) for i in range(20)))

    loop = asyncio.new_event_loop()
    with pytest.raises(ValueError, match="array 0"):
        loop.run_until_complete(restore())
    loop.close()
    del loop
    time.sleep(0.3)  # the late completions
    gc.collect()
    return late


@pytest.mark.parametrize("mode", ["steps", "thread"])
def test_a_loop_closed_under_a_failed_restore_finishes_its_tasks_first(mode, caplog):
    caplog.set_level(logging.WARNING, logger="asyncio")
    assert _a_failed_restore(mode) == []
    # asyncio's own loop logs "Task exception was never retrieved" here (mode steps).
    assert [r.getMessage() for r in caplog.records] == []


def test_a_loop_collected_unclosed_inside_a_running_loop_closes_quietly(monkeypatch):
    # A loop's __del__ closes it wherever the collection happens: it cannot run there.
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(repr(u.exc_value)))

    async def collect_an_unclosed_loop():
        asyncio.new_event_loop()
        gc.collect()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # "unclosed event loop"
        asyncio.run(collect_an_unclosed_loop())
    assert seen == []
