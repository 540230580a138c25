"""The agreement table of `lm eval --tasks` against lm-evaluation-harness's own `hf`
backend (what tests/e2e/test_harness.py asserts, printed): tests/hf_reference.py
`harness` saves two tiny random models as transformers does and runs three local tasks
through the harness's hf backend; lmlab imports each directory and runs the same tasks.

    python benchmarks/harness_agreement.py --hf-python ~/.cache/lmlab/hfref-py311/bin/python
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASKS = ["tiny_choice", "tiny_rolling", "tiny_generate"]
METRICS = {"tiny_choice": ["acc,none", "acc_norm,none"], "tiny_rolling": ["bits_per_byte,none"],
           "tiny_generate": ["exact_match,none"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-python", required=True)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="harness_agreement_"))
    subprocess.run([args.hf_python, str(ROOT / "tests" / "hf_reference.py"), "harness",
                    str(work)], check=True, capture_output=True)
    from lm.cli import main as lm_main
    from lm.evals.downstream import evaluate_tasks, go_offline
    go_offline()
    from lm.evals.harness import HarnessLM
    from lm.train.param_source import restore_for_inference
    print("| model | task | metric | lmlab | hf | max abs d loglikelihood | same text |")
    print("|---|---|---|---:|---:|---:|---|")
    for case in ("llama-bos", "qwen2-plain"):
        run = work / "runs" / case
        assert lm_main(["import", "hf", str(work / case), "--run-dir", str(run)]) == 0
        ref = json.loads((work / case / "harness.json").read_text())
        setup, params, _ = restore_for_inference(run)
        ours = evaluate_tasks(HarnessLM(setup, params, batch_size=4, progress=False), TASKS,
                              include_paths=[str(work / "tasks")], bootstrap_iters=0)
        for task in TASKS:
            theirs = {s["doc_id"]: s["resps"] for s in ref["samples"][task]}
            mine = {s["doc_id"]: s["filtered_resps"] for s in ours["samples"][task]}
            worst, same = 0.0, "-"
            if task == "tiny_generate":
                same = f"{sum(mine[d] == theirs[d] for d in theirs)}/{len(theirs)}"
                worst_s = "-"
            else:
                for d, resps in theirs.items():
                    pairs = ([(mine[d][0], resps[0])] if task == "tiny_rolling" else
                             [(a[0], b[0]) for a, b in zip(mine[d], resps)])
                    worst = max([worst] + [abs(float(a) - float(b)) for a, b in pairs])
                worst_s = f"{worst:.1e}"
            for metric in METRICS[task]:
                a, b = ours["results"][task][metric], ref["results"][task][metric]
                print(f"| {case} | {task} ({len(theirs)} docs) | {metric.split(',')[0]} | "
                      f"{a:.6g} | {b:.6g} | {worst_s} | {same} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
