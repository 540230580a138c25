"""The training driver (lm/train/driver.py) with a toy objective that is not a language
model: what a new objective supplies (a state, a step, a batch source, an evaluation,
what to checkpoint) is enough, and the order, cadence, divergence, disk-full and
closing behaviour come from the driver, for one run or K batched ones. In-process and
fast: no model, no subprocess."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.config import TrainConfig
from lm.errors import DiskFull
from lm.train.checkpoint import Checkpointer
from lm.train.driver import Job, drive, open_run

COUNTS = {"total": 1, "non_embedding": 1, "active": 1, "active_non_embedding": 1}


class Numbers(grain.DatasetIterator):
    """Batches {"x": [K]}: x = the batch's index; run `bad` gets NaN at batch `bad_at`."""

    def __init__(self, k: int, bad: int = -1, bad_at: int = -1):
        super().__init__()
        self.k, self.bad, self.bad_at, self.i = k, bad, bad_at, 0
        self.closed = False

    def __next__(self):
        self.i += 1
        x = np.full([self.k], self.i, np.float32)
        if self.i == self.bad_at:
            x[self.bad] = np.nan
        return {"x": x, "loss_mask": np.ones([self.k], np.float32)}

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = state["i"]

    def close(self):
        self.closed = True


@jax.jit
def toy_step(state, batch):
    """Running mean of the batches, per run; the loss is the distance to the batch."""
    w = state["w"] + (batch["x"] * batch["loss_mask"] - state["w"]) / (state["step"] + 1)
    loss = jnp.abs(batch["x"] - w)
    return {"w": w, "step": state["step"] + 1}, {
        "loss": loss, "finite": jnp.isfinite(w), "grad_norm": loss, "w": w}


def toy_job(tmp_path: Path, k: int, cfg: TrainConfig, batches: Numbers) -> Job:
    runs = [open_run(tmp_path / f"r{i}", cfg, 0, COUNTS, 1.0,
                     Checkpointer(tmp_path / f"r{i}" / "checkpoints", cfg.checkpoint_every, 10),
                     label=f"trial r{i}: ") for i in range(k)]
    return Job(cfg=cfg, runs=runs, batches=batches,
               state={"w": jnp.zeros([k]), "step": jnp.zeros([], jnp.int32)}, start=0,
               step=toy_step,
               evaluate=lambda s: [{"loss": float(w), "bpb": 0.0} for w in np.asarray(s["w"])],
               checkpoint=lambda s, i: ({"w": s["w"][i]}, batches),
               tokens_per_step=1, flops_per_token=1.0, peak_flops=1.0,
               per_run=lambda tree: [jax.tree.map(lambda x: x[i], tree) for i in range(k)],
               batched=True)


def _cfg(**kw) -> TrainConfig:
    return dataclasses.replace(TrainConfig(), steps=6, log_every=1, eval_every=3,
                               checkpoint_every=2, tensorboard=False, **kw)


def _records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == kind]


def _steps(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def test_a_toy_objective_trains_through_the_driver_and_a_diverging_run_is_masked(tmp_path):
    for d in ("r0", "r1"):
        (tmp_path / d).mkdir()
    batches = Numbers(2, bad=1, bad_at=3)
    job = toy_job(tmp_path, 2, _cfg(), batches)
    assert drive(job) == [0, 3]
    assert batches.closed
    ok, bad = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("r0", "r1"))
    assert ok["status"] == "completed" and ok["steps"] == 6
    assert bad["status"] == "diverged at step 3" and bad["steps"] == 2
    assert [r["step"] for r in _records(tmp_path / "r0", "train")] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in _records(tmp_path / "r1", "train")] == [1, 2]
    assert [r["step"] for r in _records(tmp_path / "r0", "eval")] == [3, 6]
    assert ok["final_val_loss"] == pytest.approx(3.5)  # mean of 1..6
    assert _steps(tmp_path / "r0") == ["2", "4", "6"]
    assert _steps(tmp_path / "r1") == ["2"]  # never a checkpoint of a non-finite state


def test_a_toy_objective_on_a_full_disk_stops_every_run_with_its_account_written(
        tmp_path, monkeypatch):
    for d in ("r0", "r1"):
        (tmp_path / d).mkdir()
    monkeypatch.setenv("LMLAB_FAULT", "enospc@4")
    batches = Numbers(2)
    job = toy_job(tmp_path, 2, _cfg(), batches)
    with pytest.raises(DiskFull) as e:
        drive(job)
    path = tmp_path / "r0" / "checkpoints" / "4"
    assert str(e.value) == (f"no space left on device writing {path}; checkpoints up to step "
                            "2 are intact: free space and rerun the same command to resume")
    assert batches.closed
    for d in ("r0", "r1"):
        summary = json.loads((tmp_path / d / "summary.json").read_text())
        assert summary["status"] == f"failed: no space left on device ({path})"
        assert _steps(tmp_path / d) == ["2"]
