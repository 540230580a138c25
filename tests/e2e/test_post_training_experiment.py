"""experiments/post_training.py --smoke end to end, as a user runs it: the data, an SFT
policy, per seed SFT continued / DPO / GRPO from it, held-out accuracy, and the table
with GRPO's KL to the reference and its generation share."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_smoke_run_writes_the_table_and_results(tmp_path):
    work = tmp_path / "post"
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / "post_training.py"),
                           "--workdir", str(work), "--smoke"], capture_output=True, text=True,
                          cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads((work / "results.json").read_text())
    assert set(results["arms"]) == {"sft_more", "dpo", "grpo"}
    for arm in results["arms"].values():
        assert 0.0 <= arm["accuracy"] <= 1.0 and arm["n"] == 2
    grpo = results["grpo"]
    assert grpo["kl_over_training"] and all(v >= 0 for v in grpo["kl_over_training"].values())
    assert 0 < grpo["gen_share"] < 1 and grpo["tokens_generated"] > 0
    table = (work / "results.md").read_text()
    assert "| dpo |" in table and "| grpo |" in table and "KL to the SFT policy" in table
    # a second run finds every stage done: no command runs again
    commands = (work / "log.txt").read_text().count("$ lm ")
    again = subprocess.run([sys.executable, str(ROOT / "experiments" / "post_training.py"),
                            "--workdir", str(work), "--smoke"], capture_output=True,
                           text=True, cwd=ROOT, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (work / "log.txt").read_text().count("$ lm ") == commands
