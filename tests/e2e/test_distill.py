"""`lm train --distill-from`: a narrower student distils from a tiny trained run (kd_loss
in its records, the teacher's FLOPs in its accounting), a resumed distillation equals the
uninterrupted one, and a LoRA student starting from its teacher starts at zero KD loss."""

from __future__ import annotations

import json

import pytest
from conftest import TINY, lm, sets, train_losses

pytestmark = pytest.mark.slow  # every test here runs `lm` end to end


def _records(run, key):
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "train" and key in rec:
            out[rec["step"]] = rec[key]
    return out


STUDENT = [*TINY, "model.d_model=16", "log_every=1", "distill.temperature=2",
           "distill.weight=0.7"]


def test_a_student_distils_and_resumes_as_if_uninterrupted(tiny_run, tmp_path):
    full = tmp_path / "full"
    result = lm("train", "--run-dir", str(full), "--distill-from", str(tiny_run), *sets(*STUDENT))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "distilling from checkpoint step 12 of" in result.stdout
    kd = _records(full, "kd_loss")
    assert sorted(kd) == list(range(1, 13)) and all(v > 0 for v in kd.values())
    assert kd[12] < kd[1]  # the student moves towards its teacher
    summary = json.loads((full / "summary.json").read_text())
    teacher = json.loads((tiny_run / "summary.json").read_text())
    assert summary["teacher_flops_per_token"] == pytest.approx(teacher["flops_per_token"] / 3)
    assert summary["flops_per_token"] > summary["teacher_flops_per_token"]
    pin = json.loads((full / "distill_teacher.json").read_text())
    assert pin == {"kind": "run", "path": str(tiny_run), "step": 12}
    assert not any("teacher" in p.name for p in (full / "checkpoints").rglob("*"))

    run = tmp_path / "resumed"
    first = lm("train", "--run-dir", str(run), "--distill-from", str(tiny_run), *sets(*STUDENT),
               env={"LMLAB_FAULT": "sigterm@6"})
    assert first.returncode == 128 + 15, first.stderr[-2000:]
    second = lm("train", "--run-dir", str(run), "--distill-from", str(tiny_run), *sets(*STUDENT))
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from step" in second.stdout
    assert train_losses(run) == train_losses(full)
    assert _records(run, "kd_loss") == kd


def test_a_lora_student_from_its_teacher_starts_at_zero_kd_loss(tiny_run, tmp_path):
    run = tmp_path / "lora"
    result = lm("train", "--run-dir", str(run), "--init-from", str(tiny_run), "--distill-from",
                str(tiny_run), *sets("lora.rank=4", "data.seq_len=32", "batch_size=4", "steps=4", "log_every=1", "eval_every=4",
                                     "eval_batches=1", "distill.weight=0.5"))
    assert result.returncode == 0, result.stderr[-2000:]
    kd = _records(run, "kd_loss")
    assert abs(kd[1]) < 1e-6  # the adapters start at zero: the student is the teacher
    assert kd[4] > kd[1]
