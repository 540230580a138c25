"""`lm analyze --task-scaling` as a real command on a ladder of run directories whose
task scores follow a known two-step law."""

from __future__ import annotations

import json
import math

import pytest
from conftest import lm

pytestmark = pytest.mark.slow  # `lm` end to end


def test_lm_analyze_task_scaling_predicts_the_largest_run(tmp_path):
    def bpb(c):
        return 2500.0 * c ** -0.2 + 0.5

    def acc(loss):
        return 0.7 / (1 + math.exp(6.0 * (loss - 1.1))) + 0.25

    for c in (1e17, 3e17, 1e18, 3e18, 1e19, 3e19, 1e20, 1e21):
        run = tmp_path / f"c{c:.0e}"
        (run / "evals").mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"name": run.name}))
        (run / "summary.json").write_text(json.dumps(
            {"status": "completed", "params": (c / 120) ** 0.5, "tokens_seen": (c / 0.3) ** 0.5,
             "training_flops": c, "final_val_loss": 3.0}))
        (run / "evals" / "tasks-step00001000.json").write_text(json.dumps(
            {"step": 1000, "tasks": {"hellaswag": {"acc": acc(bpb(c)), "correct_bpb": bpb(c),
                                                   "num_choices": 4}}}))
    r = lm("analyze", "--task-scaling", "--n-boot", "20", str(tmp_path))
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if "held-out" in ln)
    pred = float(line.split("predicted acc ")[1].split()[0])
    measured = float(line.split("measured ")[1].split(";")[0])
    assert line.strip().startswith("held-out c1e+21: predicted acc ")
    assert measured == pytest.approx(acc(bpb(1e21)), abs=1e-3)
    assert pred == pytest.approx(measured, abs=2e-3)  # noiseless: the law is recovered
    assert (tmp_path / "analysis" / "task_scaling_hellaswag.png").exists()
