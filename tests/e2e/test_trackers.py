"""Weights & Biases beside metrics.jsonl, offline (nothing leaves the machine): a tiny
run's W&B record, read back from the run's own `.wandb` file with W&B's protobuf
records, holds the config and every train / eval record of metrics.jsonl; an
interrupted run resumed logs to the same W&B run id; wandb missing is one line, exit 2,
before the run dir exists."""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TINY, assert_train_refused, lm, sets, train_losses

pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

pytestmark = pytest.mark.slow  # `lm train` end to end

WANDB = ("track.wandb=true", "track.project=lmlab-test", "track.tags=tiny,test")


def _env(tmp_path: Path) -> dict:
    """Offline and silent; W&B's own config, cache and data folders under tmp_path."""
    home = tmp_path / "wandb-home"
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(home / "dir"),
            "WANDB_CONFIG_DIR": str(home / "config"), "WANDB_CACHE_DIR": str(home / "cache"),
            "WANDB_DATA_DIR": str(home / "data"), "WANDB_API_KEY": ""}


def wandb_records(path: Path):
    """The protobuf `Record`s of a .wandb file: W&B's transaction log, a LevelDB-style
    log (32 KiB blocks of chunks, each a 7-byte header: CRC32C, length, type) after a
    7-byte file header (':W&B', magic 0xBEE1, version 0)."""
    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zeroed space: padding
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline_run(run_dir: Path) -> dict:
    """{id, config, history: [row], summary, exit_code} of each offline W&B run under
    run_dir/wandb/ (oldest first)."""
    out = []
    for d in sorted((run_dir / "wandb").glob("offline-run-*")):
        [log] = d.glob("run-*.wandb")
        run = {"config": {}, "history": [], "summary": {}, "exit_code": None}
        for r in wandb_records(log):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run["id"] = r.run.run_id
                run["tags"] = list(r.run.tags)
                run["config"].update({_key(i): json.loads(i.value_json)
                                      for i in r.run.config.update})
            elif kind == "config":
                run["config"].update({_key(i): json.loads(i.value_json)
                                      for i in r.config.update})
            elif kind == "history":
                run["history"].append({_key(i): json.loads(i.value_json)
                                       for i in r.history.item})
            elif kind == "summary":
                run["summary"].update({_key(i): json.loads(i.value_json)
                                       for i in r.summary.update})
            elif kind == "exit":
                run["exit_code"] = r.exit.exit_code
        run["config"].pop("_wandb", None)
        out.append(run)
    return out


def _float(v):
    return float(v) if isinstance(v, str) else v  # metrics.jsonl writes "nan" / "inf"


def _logged(run: dict, kind: str) -> dict[int, dict]:
    """{step: {name: value}} of the run's `kind` rows, the names of metrics.jsonl."""
    out = {}
    for row in run["history"]:
        values = {k[len(kind) + 1:]: v for k, v in row.items() if k.startswith(f"{kind}/")}
        if values:
            out.setdefault(row["step"], {}).update(values)
    return out


def _records(run_dir: Path, kind: str) -> dict[int, dict]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.pop("kind") == kind:
            step = r.pop("step")
            out[step] = {k: _float(v) for k, v in r.items()}
    return out


def _assert_same(logged: dict, records: dict) -> None:
    assert sorted(logged) == sorted(records)
    for step, values in records.items():
        assert logged[step].keys() == values.keys(), step
        for k, v in values.items():
            w = logged[step][k]
            assert (math.isnan(v) and math.isnan(_float(w))) or w == pytest.approx(v, rel=1e-9), (
                step, k)


def test_wandb_offline_run_holds_the_config_and_the_records_of_metrics_jsonl(tmp_path):
    run = tmp_path / "run"
    result = lm("train", "--run-dir", str(run), *sets(*TINY, *WANDB), env=_env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tracker failed" not in result.stdout
    [wb] = read_offline_run(run)
    assert wb["id"] == (run / "run_id").read_text().strip()
    assert wb["tags"] == ["tiny", "test"]
    assert wb["config"] == json.loads((run / "config.json").read_text())
    assert wb["config"]["track"]["wandb"] is True
    _assert_same(_logged(wb, "train"), _records(run, "train"))
    _assert_same(_logged(wb, "eval"), _records(run, "eval"))
    assert sorted(_records(run, "eval")) == [6, 12]
    summary = json.loads((run / "summary.json").read_text())
    assert {k: wb["summary"][k] for k in summary} == pytest.approx(summary)
    assert wb["summary"]["status"] == "completed" and wb["exit_code"] == 0
    assert not (ROOT / "wandb").exists()  # the run dir's, never the working directory's


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path):
    run = tmp_path / "run"
    args = ("train", "--run-dir", str(run), *sets(*TINY, "log_every=1", *WANDB))
    first = lm(*args, env={**_env(tmp_path), "LMLAB_FAULT": "sigterm@6"})
    assert first.returncode == 128 + 15, first.stderr[-3000:]
    assert max(train_losses(run)) == 6
    second = lm(*args, env=_env(tmp_path))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step 6" in second.stdout
    before, after = read_offline_run(run)  # one offline folder per start, one run id
    assert before["id"] == after["id"] == (run / "run_id").read_text().strip()
    assert sorted(_logged(before, "train")) == [1, 2, 3, 4, 5, 6]
    assert sorted(_logged(after, "train")) == list(range(7, 13))
    assert before["summary"]["status"] == "interrupted"
    assert after["summary"]["status"] == "completed"
    _assert_same({**_logged(before, "train"), **_logged(after, "train")}, _records(run, "train"))
    _assert_same({**_logged(before, "eval"), **_logged(after, "eval")}, _records(run, "eval"))


def test_wandb_missing_is_one_line_before_the_run_dir_exists(tmp_path, lm_here, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    assert_train_refused(lm_here, tmp_path / "run", ["track.wandb=true"],
                         "track.wandb=true needs the wandb package")
