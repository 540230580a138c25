"""Training on a data mixture (lm/data/mixture.py): per-source tokens, epochs and
validation loss in the run's records; a resume across a stage switch reproduces the
uninterrupted run; a later stage edited before resuming changes only what follows."""

from __future__ import annotations

import json

import pytest
from conftest import TINY, lm, sets, train_losses

pytestmark = pytest.mark.slow
MIX = [*TINY, "model.max_seq_len=128", "data.seq_len=96", "log_every=1",
       "data.sources=plays:0.7:shakespeare;keys:0.3:passkey"]
STAGES = "data.stages=4:plays=1;1.0:plays=0.3,keys=0.7"


def _records(run, kind):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == kind]


def test_resume_across_a_stage_switch_and_an_edited_later_stage(tmp_path):
    full = tmp_path / "full"
    assert lm("train", "--run-dir", str(full), *sets(*MIX, STAGES)).returncode == 0
    train = {r["step"]: r for r in _records(full, "train")}
    assert train[4]["tokens/keys"] == 0 and train[4]["tokens/plays"] == 4 * 4 * 96
    assert train[12]["tokens/keys"] > 0  # the second stage draws keys
    assert train[12]["tokens/plays"] + train[12]["tokens/keys"] == 12 * 4 * 96
    assert 0 < train[12]["epochs/keys"] < 1
    evals = _records(full, "eval")
    assert {"loss/plays", "loss/keys", "bpb/plays", "bpb/keys"} <= evals[-1].keys()
    summary = json.loads((full / "summary.json").read_text())
    assert summary["final_val_loss/keys"] == evals[-1]["loss/keys"]

    resumed = tmp_path / "resumed"
    first = lm("train", "--run-dir", str(resumed), *sets(*MIX, STAGES),
               env={"LMLAB_FAULT": "sigterm@6"})
    assert first.returncode == 128 + 15, first.stderr[-2000:]
    second = lm("train", "--run-dir", str(resumed), *sets(*MIX, STAGES))
    assert second.returncode == 0 and "resumed from step 6" in second.stdout
    assert train_losses(resumed) == train_losses(full)  # exactly, across the switch at 4

    edited = tmp_path / "edited"
    assert lm("train", "--run-dir", str(edited), *sets(*MIX, STAGES),
              env={"LMLAB_FAULT": "sigterm@6"}).returncode == 128 + 15
    third = lm("train", "--run-dir", str(edited), *sets(*MIX, "data.stages=4:plays=1;1.0:keys=1"))
    assert third.returncode == 0, third.stderr[-2000:]
    a, b = train_losses(full), train_losses(edited)
    assert all(a[s] == b[s] for s in range(1, 7))  # the past is what it was
    after = {r["step"]: r for r in _records(edited, "train")}
    assert after[12]["tokens/plays"] == after[6]["tokens/plays"]  # only keys after the edit


def test_a_missing_source_path_is_one_line(tmp_path):
    out = lm("train", "--run-dir", str(tmp_path / "run"),
             *sets(*TINY, "data.sources=plays:1:shakespeare;web:1:/no/such/corpus.jsonl"))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "/no/such/corpus.jsonl" in lines[0], lines
    assert not (tmp_path / "run").exists()
