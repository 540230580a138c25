"""Orbax checkpoints of the train state and the grain data iterator.

One async CheckpointManager per run: a step directory holds `state` (params, optimizer
state, step, RNG) and `data` (each process's grain iterator state), so a restart
resumes model, optimizer and data stream together. The data iterator may be an
`lm.data.Prefetcher` (a grain DatasetIterator): its state is the position after the last
batch a step consumed, not the batches its thread has read ahead. The train loop saves
only states it has verified finite.
"""

from __future__ import annotations

from pathlib import Path

import grain
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: Path, every: int, keep: int):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=every, enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iterator, force: bool = False) -> bool:
        """Starts an async save when `step` is on the interval (or `force`)."""
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator)), force=force)

    def restore(self, step: int, abstract_state, data_iterator):
        """Returns the state; the data iterator is restored in place."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iterator)))
        return restored["state"]

    def restore_params(self, step: int, abstract_state):
        """Only the train state (for eval and sampling, which need no data iterator)."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
        return restored["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
