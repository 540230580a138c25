"""lm-evaluation-harness on lmlab models (`lm eval --tasks`, lm/evals/harness.py) against
the harness's own `hf` backend: tests/hf_reference.py `harness` saves two tiny random
models as transformers does (llama-bos: a BOS-framing tokenizer and a second
end-of-sequence id; qwen2-plain: no BOS, so the harness's prefix token is EOS), writes
three local tasks (multiple choice, rolling loglikelihood over passages longer than the
models' 64 positions, greedy generation with stop strings) and runs them through
`lm_eval.simple_evaluate(model="hf")`. The same directories imported with `lm import hf`
must give the same per-request log-likelihoods (1e-4), the same accuracies and the same
generated text."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from lm.cli import main

from test_interop_hf import HERE, hf_python, needs_hf

pytestmark = pytest.mark.slow
TOL = 1e-4
CASES = ["llama-bos", "qwen2-plain"]
TASKS = ["tiny_choice", "tiny_rolling", "tiny_generate"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("harness")
    subprocess.run([hf_python(), str(HERE / "hf_reference.py"), "harness", str(out)],
                   check=True, capture_output=True, text=True, timeout=900)
    return out


@pytest.fixture(scope="module")
def imported(reference, tmp_path_factory):
    runs = {}
    for case in CASES:
        run = tmp_path_factory.mktemp("run") / case
        assert main(["import", "hf", str(reference / case), "--run-dir", str(run)]) == 0
        runs[case] = run
    return runs


def _ours(run: Path, folder: Path) -> dict:
    from lm.evals.downstream import evaluate_tasks, go_offline
    go_offline()
    from lm.evals.harness import HarnessLM
    from lm.train.param_source import restore_for_inference
    setup, params, _ = restore_for_inference(run)
    return evaluate_tasks(HarnessLM(setup, params, batch_size=4, progress=False), TASKS,
                          include_paths=[str(folder)], bootstrap_iters=0)


@needs_hf
@pytest.mark.parametrize("case", CASES)
def test_requests_and_scores_equal_the_harness_hf_backend(reference, imported, case):
    ref = json.loads((reference / case / "harness.json").read_text())
    ours = _ours(imported[case], reference / "tasks")
    worst = 0.0
    for task in TASKS:
        theirs = {s["doc_id"]: s["resps"] for s in ref["samples"][task]}
        mine = {s["doc_id"]: s["filtered_resps"] for s in ours["samples"][task]}
        assert mine.keys() == theirs.keys() and mine
        for doc, resps in theirs.items():
            if task == "tiny_generate":
                assert mine[doc] == resps, (task, doc)
            elif task == "tiny_rolling":
                worst = max(worst, abs(float(mine[doc][0]) - float(resps[0])))
            else:
                for (ll, greedy), (ll_ref, greedy_ref) in zip(mine[doc], resps, strict=True):
                    worst = max(worst, abs(float(ll) - float(ll_ref)))
                    assert bool(greedy) == bool(greedy_ref)
        for metric in ("acc,none", "acc_norm,none", "exact_match,none"):
            if metric in ref["results"][task]:
                assert ours["results"][task][metric] == ref["results"][task][metric]
        if task == "tiny_rolling":
            got = ours["results"][task]["bits_per_byte,none"]
            assert abs(got - ref["results"][task]["bits_per_byte,none"]) < 1e-5
    assert worst < TOL, worst
    # Generation stopped where the harness's stop strings say, not always at max tokens.
    texts = [s["resps"][0] for s in ref["samples"]["tiny_generate"]]
    assert len(set(texts)) > 1


@needs_hf
def test_lm_eval_tasks_prints_the_table_and_writes_harness_keys(reference, imported, tmp_path,
                                                                capfd):
    run = imported["llama-bos"]
    out = tmp_path / "results.json"
    assert main(["eval", "--run", str(run), "--tasks", "tiny_choice", "--include-path",
                 str(reference / "tasks"), "--limit", "8", "--json", str(out)]) == 0
    printed = capfd.readouterr().out
    assert "|tiny_choice|" in printed.replace(" ", "") and "acc" in printed
    results = json.loads(out.read_text())["results"]["tiny_choice"]
    assert results["sample_len"] == 8 and 0.0 <= results["acc,none"] <= 1.0
    kept = json.loads(next((run / "evals").glob("tasks-step*.json")).read_text())
    assert kept["tasks"]["tiny_choice"]["acc"] == results["acc,none"]
    assert kept["tasks"]["tiny_choice"]["num_choices"] == 4.0
    assert kept["tasks"]["tiny_choice"]["correct_bpb"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "no_such_task_xyz"], "unknown task 'no_such_task_xyz'"),
    (["--tasks", "arc_easy"], "task arc_easy: its data is not on disk (dataset allenai/ai2_arc"),
    (["--tasks", "arc_easy", "--limit", "0"], "--limit must be >= 1"),
    (["--tasks", ","], "expected comma-separated task names"),
    (["--tasks", "arc_easy", "--include-path", "/no/such/dir"], "--include-path /no/such/dir"),
])
def test_bad_task_requests_are_one_line_and_exit_2(tmp_path, capfd, argv, message):
    capfd.readouterr()
    assert main(["eval", "--run", str(tmp_path), *argv]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
