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
from pathlib import Path

import pytest

from lm.cli import main

from test_interop_hf import hf_reference, needs_hf

pytestmark = pytest.mark.slow
TOL = 1e-4
CASES = ["llama-bos", "qwen2-plain"]
TASKS = ["tiny_choice", "tiny_rolling", "tiny_generate"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return hf_reference("harness", tmp_path_factory.mktemp("harness"), timeout=900)


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


# ---------------------------------------------------------------- during training
TASK_SETS = ("evals.tasks=shakespeare_next_line,shakespeare_perplexity", "evals.limit=6")


def _task_records(run: Path) -> dict:
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("tasks/")}
            for r in records if r["kind"] == "eval"}


def test_task_scores_at_eval_steps_and_a_resumed_run_scores_the_same(tmp_path):
    from conftest import TINY, lm, sets
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert lm("train", "--run-dir", str(full), *sets(*TINY, *TASK_SETS)).returncode == 0
    first = lm("train", "--run-dir", str(resumed), *sets(*TINY, *TASK_SETS),
               env={"LMLAB_FAULT": "sigterm@6"})
    assert first.returncode == 128 + 15, first.stderr[-2000:]
    second = lm("train", "--run-dir", str(resumed), *sets(*TINY, *TASK_SETS))
    assert second.returncode == 0 and "resumed from step 6" in second.stdout
    a, b = _task_records(full), _task_records(resumed)
    assert sorted(a) == [6, 12] and a[12]
    assert "tasks/shakespeare_next_line/acc" in a[12]
    assert "tasks/shakespeare_perplexity/bits_per_byte" in a[12]
    assert a == b  # the same parameters give the same scores
    summary = json.loads((full / "summary.json").read_text())
    assert summary["tasks/shakespeare_next_line/acc"] == a[12]["tasks/shakespeare_next_line/acc"]
    kept = json.loads((full / "evals" / "tasks-step00000012.json").read_text())
    assert kept["tasks"]["shakespeare_next_line"]["acc"] == summary[
        "tasks/shakespeare_next_line/acc"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(full / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval/tasks/shakespeare_next_line/acc")] == [6, 12]


def test_a_failing_task_never_stops_training(tmp_path):
    """A task whose scoring raises (its process_results) fails at every evaluation; the
    run still trains to the end and keeps its checkpoints. A task whose documents do not
    render is refused before training, in one line."""
    from conftest import TINY, lm, sets
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "broken.jsonl").write_text('{"text": "a b c", "gold": 0}\n')
    (folder / "scoring.py").write_text(
        "def process_results(doc, results):\n    raise ValueError('boom')\n")
    head = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {folder / 'broken.jsonl'}\ntest_split: test\n"
            "output_type: multiple_choice\ndoc_to_text: \"{{text}}\"\ndoc_to_target: gold\n"
            "metric_list:\n  - metric: acc\n")
    (folder / "broken.yaml").write_text(
        "task: broken_task\n" + head + "doc_to_choice: [\" x\", \" y\"]\n"
        "process_results: !function scoring.process_results\n")
    (folder / "unrendered.yaml").write_text(
        "task: unrendered_task\n" + head + "doc_to_choice: \"{{no_such_field}}\"\n")
    run = tmp_path / "run"
    out = lm("train", "--run-dir", str(run), *sets(*TINY, "evals.tasks=broken_task",
                                                    f"evals.include_path={folder}"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "tasks @ 6: failed, training continues (ValueError: boom)" in out.stderr
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert (run / "checkpoints" / "12").is_dir()
    other = tmp_path / "other"
    out = lm("train", "--run-dir", str(other), *sets(*TINY, "evals.tasks=unrendered_task",
                                                      f"evals.include_path={folder}"))
    assert out.returncode == 2 and "task unrendered_task does not load" in out.stderr
    assert not other.exists()


def test_train_refuses_unknown_tasks_before_the_run_dir_exists(tmp_path):
    from conftest import TINY, lm, sets
    run = tmp_path / "run"
    out = lm("train", "--run-dir", str(run), *sets(*TINY, "evals.tasks=hellaswag"))
    assert out.returncode == 2 and "task hellaswag: its data is not on disk" in out.stderr
    assert not run.exists()


# ------------------------------------------------------- packing against plain forwards
def test_packed_loglikelihoods_equal_each_request_alone(tiny_run):
    """Requests packed several to a row (segment ids, positions from 0) score what the
    model's forward on each request alone gives."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from lm.evals.harness import HarnessLM
    from lm.train.param_source import restore_for_inference
    run, params, _ = restore_for_inference(tiny_run)
    lm_ = HarnessLM(run, params, batch_size=2, progress=False)
    rng = np.random.default_rng(0)
    reqs = [(None, rng.integers(0, 256, size=int(rng.integers(1, 20))).tolist(),
             rng.integers(0, 256, size=int(rng.integers(1, 8))).tolist()) for _ in range(11)]
    # one longer than the model's 64 positions: cut from the left, as the harness does
    reqs.append((None, list(range(80)), [5, 6, 7]))
    got = lm_._loglikelihood_tokens(reqs)
    model = nnx.merge(run.pieces.graphdef, params)
    for (_, ctx, cont), (ll, greedy) in zip(reqs, got):
        whole = (ctx + cont)[-65:]
        logits = model(jnp.asarray([whole[:-1]]))[0][0]
        logp = np.asarray(jax_log_softmax(logits))
        targets = whole[1:][-len(cont):]
        rows = logp[-len(cont):]
        want = float(sum(rows[i, t] for i, t in enumerate(targets)))
        assert abs(ll - want) < 1e-4, (ll, want)
        assert greedy == all(int(np.argmax(rows[i])) == t for i, t in enumerate(targets))


def test_generate_until_is_the_engines_output(tiny_run):
    """generate_until runs every request through one batched engine: a sampled request's
    text is the engine's sample for the harness seed (the one-at-a-time sampler draws
    others), cut at the first stop string; a greedy one is the KV-cache sampler's."""
    from types import SimpleNamespace

    from lm_eval.models.utils import postprocess_generated_text

    from lm.evals.harness import HarnessLM
    from lm.infer import Engine, Request
    from lm.sample import generate
    from lm.train.param_source import restore_for_inference
    run, params, _ = restore_for_inference(tiny_run)
    lm_ = HarnessLM(run, params, batch_size=2, progress=False, seed=7)
    tok = run.tokenizer
    asks = [("ROMEO:", {"until": ["e"], "max_gen_toks": 12}),
            ("JULIET:", {"until": ["\n\n"], "max_gen_toks": 10, "do_sample": True,
                         "temperature": 1.0}),
            ("To be, or not", {"until": ["zzz"], "max_gen_toks": 9})]
    got = lm_.generate_until([SimpleNamespace(args=a) for a in asks])
    engine = Engine(run.pieces.graphdef, params, slots=1, pages=5, page_size=16)
    for (context, kw), text in zip(asks, got):
        ids = [int(t) for t in tok.frame(tok.encode(context))]
        if kw.get("do_sample"):
            new = engine.generate([Request(tuple(ids), max_new_tokens=kw["max_gen_toks"],
                                           temperature=1.0, seed=7,
                                           stop_ids=tuple(tok.stop_ids))])[0]
            new = new.completions[0].tokens
        else:
            new = generate(run.pieces.graphdef, params, ids, kw["max_gen_toks"],
                           temperature=0.0, max_seq_len=64, stop_ids=tok.stop_ids)[0]
        assert text == postprocess_generated_text(tok.decode(new), kw["until"], None), context
    assert lm_.tokens_generated > 0


def jax_log_softmax(x):
    import jax
    return jax.nn.log_softmax(x.astype("float32"), axis=-1)
