"""experiments/linearize.py --smoke end to end, as a user runs it: the parent, its
linearization, the LoRA fine-tune and the two references trained and evaluated, then
decoding at two lengths; the tables printed and results.json written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_linearize_experiment_smoke(tmp_path):
    work = tmp_path / "linearize"
    result = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "linearize.py"), "--workdir", str(work),
         "--smoke"], capture_output=True, text=True, cwd=ROOT, timeout=600,
        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    out = result.stdout
    for row in ("| parent (P steps) |", "| parent + F steps (full fine-tune) |",
                "| linearized (attention transfer) |", "| linearized + LoRA (F steps) |",
                "| hybrid shape from scratch (P + F steps) |"):
        assert row in out, out
    decoding = out[out.index("Decoding"):]
    decode_rows = [line for line in decoding.splitlines()
                   if line.startswith("| parent (") or line.startswith("| linearized (")]
    assert len(decode_rows) == 4, out  # parent and linearized at two lengths

    results = json.loads((work / "results.json").read_text())
    assert {"scale", "seeds", "loss", "transfer_relative_mse", "decode", "wall_s"} <= set(results)
    assert set(results["loss"]) == {"parent", "parent_more", "linearized", "linearized_lora",
                                    "scratch"}
    for row in results["loss"].values():
        assert len(row["values"]) == 1 and row["values"][0] > 0
    parent, linear = results["decode"]["parent"], results["decode"]["linearized"]
    assert [r["length"] for r in parent] == [64, 128]
    # The KV cache grows with the context; the linearized model's recurrent state does not.
    assert parent[1]["state_bytes"] > parent[0]["state_bytes"]
    assert linear[0]["state_bytes"] == linear[1]["state_bytes"] < parent[0]["state_bytes"]
    assert all(r["tokens_per_s"] > 0 for r in parent + linear)
