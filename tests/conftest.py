"""Shared helpers: run the real `lm` CLI in a subprocess, and a tiny fast config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# A model small enough that a few training steps take a second or two on CPU.
TINY = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=64",
    "data.seq_len=32", "batch_size=4", "steps=12", "log_every=2", "eval_every=6",
    "eval_batches=2", "checkpoint_every=4", "optim.warmup_steps=2",
]


def lm(*args: str, env: dict | None = None, cwd: Path | None = None,
       timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **(env or {}))
    full_env.setdefault("JAX_PLATFORMS", "cpu")
    return subprocess.run([sys.executable, "-m", "lm.cli", *args], capture_output=True,
                          text=True, env=full_env, cwd=cwd or ROOT, timeout=timeout)


def sets(*overrides: str) -> list[str]:
    out = []
    for o in overrides:
        out += ["--set", o]
    return out


def train_losses(run_dir: Path) -> dict[int, float]:
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "train":
            losses[rec["step"]] = rec["loss"]
    return losses


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One completed tiny run shared by tests that only read it."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    result = lm("train", "--run-dir", str(run), *sets(*TINY))
    assert result.returncode == 0, result.stderr[-2000:]
    return run
