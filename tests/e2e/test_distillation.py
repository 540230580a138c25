"""`lm train --distill-from`: a narrower, deeper student distils from a tiny trained run
(kd_loss and hidden_loss, through a learned projection, in its records; the teacher's
FLOPs in its accounting), a resumed distillation equals the uninterrupted one, a LoRA
student starting from its teacher starts at zero KD loss, and batched trials at several
temperatures and weights share one teacher and equal the same students alone."""

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


STUDENT = [*TINY, "model.d_model=16", "model.n_layers=3", "log_every=1",
           "distill.temperature=2", "distill.weight=0.7", "distill.hidden_weight=0.5"]


def test_a_student_distils_and_resumes_as_if_uninterrupted(tiny_run, tmp_path):
    full = tmp_path / "full"
    result = lm("train", "--run-dir", str(full), "--distill-from", str(tiny_run), *sets(*STUDENT))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "distilling from checkpoint step 12 of" in result.stdout
    kd = _records(full, "kd_loss")
    assert sorted(kd) == list(range(1, 13)) and all(v > 0 for v in kd.values())
    assert kd[12] < kd[1]  # the student moves towards its teacher
    hidden = _records(full, "hidden_loss")  # through a learned projection 16 -> 32
    assert sorted(hidden) == list(range(1, 13)) and all(v > 0 for v in hidden.values())
    config = json.loads((full / "config.json").read_text())
    assert config["distill"]["teacher_width"] == 32
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
    assert _records(run, "hidden_loss") == hidden  # the projection was checkpointed
    ev = lm("eval", "--run", str(run))  # a student with a projection evaluates as any run
    assert ev.returncode == 0, ev.stderr[-2000:]


def test_a_lora_student_from_its_teacher_starts_at_zero_kd_loss(tiny_run, tmp_path):
    run = tmp_path / "lora"
    result = lm("train", "--run-dir", str(run), "--init-from", str(tiny_run), "--distill-from",
                str(tiny_run), *sets("lora.rank=4", "data.seq_len=32", "batch_size=4", "steps=4", "log_every=1", "eval_every=4",
                                     "eval_batches=1", "distill.weight=0.5",
                                     "distill.relation_weight=1", "distill.relation_heads=4"))
    assert result.returncode == 0, result.stderr[-2000:]
    kd = _records(run, "kd_loss")
    assert abs(kd[1]) < 1e-6  # the adapters start at zero: the student is the teacher
    assert kd[4] > kd[1]
    rel = _records(run, "relation_loss")  # of the adapted (merged) projections
    assert abs(rel[1]) < 1e-6 and rel[4] > rel[1]


def test_batched_trials_of_temperatures_and_weights_share_one_teacher(tiny_run, tmp_path):
    """Two students at different temperatures and weights, one program, one teacher: each
    equals the same student trained alone."""
    import numpy as np

    from lm import config as config_lib
    from lm.configs import DEFAULT_CONFIG
    from lm.train.loop import train
    from lm.train.trials import group_configs, train_group

    def cfg(*extra):
        return config_lib.apply_overrides(
            config_lib.load_config_file(DEFAULT_CONFIG),
            [*TINY, "model.d_model=16", "steps=4", "checkpoint_every=2", "eval_every=4",
             "log_every=1", "tensorboard=false", f"distill.teacher={tiny_run}", *extra])
    cfgs = [cfg("name=a", "distill.temperature=1", "distill.weight=0.5"),
            cfg("name=b", "distill.temperature=3", "distill.weight=0.9")]
    assert group_configs(cfgs, 8) == [[0, 1]]
    assert train_group(cfgs, [tmp_path / "group" / c.name for c in cfgs]) == [0, 0]
    for c in cfgs:
        assert train(c, tmp_path / "alone" / c.name) == 0
        g, a = tmp_path / "group" / c.name, tmp_path / "alone" / c.name
        for key in ("loss", "kd_loss"):
            rg, ra = _records(g, key), _records(a, key)
            assert sorted(rg) == sorted(ra) == [1, 2, 3, 4]
            np.testing.assert_allclose([rg[s] for s in ra], [ra[s] for s in ra], atol=1e-5)
        assert json.loads((g / "distill_teacher.json").read_text())["step"] == 12
    assert _records(tmp_path / "group" / "a", "kd_loss") != _records(tmp_path / "group" / "b",
                                                                      "kd_loss")


def test_a_hugging_face_teacher_pinned_by_its_fingerprint_and_another_vocab_refused(tmp_path):
    from test_interop_hf import write_hf_dir
    hf, _ = write_hf_dir(tmp_path / "hf")  # qwen3-like, vocabulary 48, a WordLevel tokenizer
    run = tmp_path / "student"
    student = [*TINY, "steps=2", "log_every=1", "eval_every=2", "eval_batches=1",
               f"data.tokenizer={hf / 'tokenizer.json'}", "model.vocab_size=48",
               "model.d_model=16", "model.n_heads=2"]
    result = lm("train", "--run-dir", str(run), "--distill-from", str(hf), *sets(*student))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"distilling from the Hugging Face dir {hf}" in result.stdout
    assert all(v > 0 for v in _records(run, "kd_loss").values())
    pin = json.loads((run / "distill_teacher.json").read_text())
    assert pin["kind"] == "hf" and [f["name"] for f in pin["files"]] == ["model.safetensors"]

    refused = lm("train", "--run-dir", str(tmp_path / "byte"), "--distill-from", str(hf),
                 *sets(*TINY))  # a byte-level student: 259 logits, another tokenizer
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "the teacher's vocabulary (48 logits" in lines[0], refused.stderr
    assert not (tmp_path / "byte").exists()
