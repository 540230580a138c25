"""The sink interface of lm/train/trackers: a tracker registered by name receives the
same records as metrics.jsonl and summary.json's fields at the end; a failing tracker
is turned off with one line and training goes on; each trial of a group is a W&B run of
its own. Through the real driver with the toy objective of test_driver.py (in-process,
no model)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from test_driver import Numbers, _cfg, _records, toy_job

from lm import schema
from lm.train import trackers
from lm.train.driver import drive


class FileSink(trackers.Sink):
    """A tracker a newcomer would write: every record as a JSON line of <run>/copy.jsonl,
    the summary in <run>/copy-summary.json."""

    def open(self, run_dir, cfg, resume_step, run_id):
        self.dir = Path(run_dir)
        self.file = open(self.dir / "copy.jsonl", "a")
        self.run_id = run_id

    def log(self, step, scalars, kind):
        self.file.write(json.dumps({"step": step, "kind": kind, **scalars}) + "\n")

    def summary(self, summary):
        (self.dir / "copy-summary.json").write_text(json.dumps({**summary, "id": self.run_id}))

    def close(self):
        self.file.close()


class BrokenSink(trackers.Sink):
    """A tracker whose service goes away at step 3."""

    def log(self, step, scalars, kind):
        if step >= 3:
            raise ConnectionError("the tracker's server went away\nmore detail")


@pytest.fixture
def registered():
    def add(name, cls):
        trackers.register(name, cls, enabled=lambda cfg: True)
        added.append(name)
    added = []
    yield add
    for name in added:
        trackers.unregister(name)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_sink_registered_by_name_gets_every_record_and_the_summary(tmp_path, registered):
    registered("copy", FileSink)
    for d in ("r0", "r1"):
        (tmp_path / d).mkdir()
    job = toy_job(tmp_path, 2, _cfg(), Numbers(2, bad=1, bad_at=3))
    assert drive(job) == [0, 3]
    for d in ("r0", "r1"):
        run = tmp_path / d
        assert _lines(run / "copy.jsonl") == _lines(run / "metrics.jsonl")
        summary = json.loads((run / "summary.json").read_text())
        copied = json.loads((run / "copy-summary.json").read_text())
        assert copied.pop("id") == (run / trackers.RUN_ID_FILE).read_text().strip()
        assert copied == summary
    assert json.loads((tmp_path / "r1" / "copy-summary.json").read_text())["status"] == (
        "diverged at step 3")
    ids = {(tmp_path / d / trackers.RUN_ID_FILE).read_text() for d in ("r0", "r1")}
    assert len(ids) == 2  # one tracked run per run dir
    assert [r["step"] for r in _records(tmp_path / "r0", "train")] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in _records(tmp_path / "r0", "eval")] == [3, 6]


def test_a_failing_tracker_is_turned_off_with_one_line_and_training_goes_on(
        tmp_path, registered, capsys):
    registered("broken", BrokenSink)
    (tmp_path / "r0").mkdir()
    job = toy_job(tmp_path, 1, _cfg(), Numbers(1))
    assert drive(job) == [0]
    warnings = [line for line in capsys.readouterr().out.splitlines() if "broken" in line]
    assert warnings == ["warning: the broken tracker failed (ConnectionError: the tracker's "
                        "server went away); it is off for the rest of this run"]
    assert [r["step"] for r in _records(tmp_path / "r0", "train")] == [1, 2, 3, 4, 5, 6]
    assert json.loads((tmp_path / "r0" / "summary.json").read_text())["status"] == "completed"


def test_the_built_in_sinks_and_a_second_registration_of_a_name_is_refused():
    assert list(trackers.registered())[:2] == ["jsonl", "tensorboard"]  # metrics.jsonl first
    with pytest.raises(ValueError, match="registered twice"):
        trackers.register("jsonl", FileSink, enabled=lambda cfg: True)


def test_each_trial_of_a_batched_group_is_a_wandb_run_of_its_own(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true",
                        "WANDB_CONFIG_DIR": str(tmp_path / "wb" / "config"),
                        "WANDB_CACHE_DIR": str(tmp_path / "wb" / "cache"),
                        "WANDB_DATA_DIR": str(tmp_path / "wb" / "data")}.items():
        monkeypatch.setenv(name, value)
    cfg = _cfg()
    cfg = dataclasses.replace(cfg, track=schema.replace(cfg.track, wandb=True))
    for d in ("r0", "r1"):
        (tmp_path / d).mkdir()
    assert drive(toy_job(tmp_path, 2, cfg, Numbers(2))) == [0, 0]
    for d in ("r0", "r1"):  # two W&B runs at once in one process, each in its run dir
        run_id = (tmp_path / d / trackers.RUN_ID_FILE).read_text().strip()
        [offline] = (tmp_path / d / "wandb").glob("offline-run-*")
        assert offline.name.endswith(f"-{run_id}")
        assert (offline / f"run-{run_id}.wandb").stat().st_size > 0
