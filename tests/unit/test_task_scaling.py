"""The two-step task scaling law (lm/analysis/task_scaling.py): recovery of known laws
from synthetic ladders, bootstrap coverage, the tasks-file loader, `lm analyze
--task-scaling`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lm.analysis import results, task_scaling
from lm.errors import ConfigError

# The truth: correct_bpb = A C^-alpha + E, acc = a / (1 + exp(-k (L - L0))) + b.
A, ALPHA, E = 2500.0, 0.2, 0.5
SIG_A, SIG_K, SIG_L0, SIG_B = 0.7, -6.0, 1.1, 0.25
LADDER = np.geomspace(1e17, 3e20, 10)
HELD_OUT = 1e21


def true_loss(c):
    return A * np.asarray(c, float) ** -ALPHA + E


def true_acc(loss):
    return SIG_A / (1 + np.exp(-SIG_K * (np.asarray(loss, float) - SIG_L0))) + SIG_B


def ladder(seed=0, compute=LADDER, loss_noise=0.005, acc_noise=0.01):
    """Each run's (compute, correct_bpb, acc): log-normal loss noise, normal acc noise
    (about the binomial error of a 2000-question task)."""
    rng = np.random.default_rng(seed)
    loss = true_loss(compute) * np.exp(rng.normal(0, loss_noise, compute.size))
    acc = true_acc(loss) + rng.normal(0, acc_noise, compute.size)
    return compute, loss, acc


@pytest.fixture(scope="module")
def fitted():
    c, loss, acc = ladder()
    fit = task_scaling.fit_task_law(loss, acc, compute=c, chance=0.25)
    boot = task_scaling.bootstrap_task_law(loss, acc, compute=c, at=HELD_OUT, fit=fit,
                                           n_boot=200, chance=0.25)
    return fit, boot


def test_fit_recovers_the_known_laws(fitted):
    fit, _ = fitted
    p = fit.params
    assert p["alpha"] == pytest.approx(ALPHA, abs=0.02)
    assert p["E"] == pytest.approx(E, abs=0.05)
    assert p["k"] == pytest.approx(SIG_K, rel=0.15)
    assert p["L0"] == pytest.approx(SIG_L0, abs=0.05)
    assert p["a"] + p["b"] == pytest.approx(SIG_A + SIG_B, abs=0.05)
    # The chained prediction of the held-out (3.3x larger) run.
    assert fit.loss(HELD_OUT) == pytest.approx(true_loss(HELD_OUT), rel=0.01)
    assert fit.acc(HELD_OUT) == pytest.approx(true_acc(true_loss(HELD_OUT)), abs=0.02)


def test_noiseless_fit_is_exact():
    c = LADDER
    loss = true_loss(c)
    fit = task_scaling.fit_task_law(loss, true_acc(loss), compute=c)
    for k, v in {"A": A, "alpha": ALPHA, "E": E, "a": SIG_A, "k": SIG_K, "L0": SIG_L0,
                 "b": SIG_B}.items():
        assert fit.params[k] == pytest.approx(v, rel=1e-4), k


def test_bootstrap_intervals_cover_the_truth_and_are_tight(fitted):
    _, boot = fitted
    truth = {"alpha": ALPHA, "E": E, "A": A, "k": SIG_K, "L0": SIG_L0,
             "loss_hat": float(true_loss(HELD_OUT)),
             "acc_hat": float(true_acc(true_loss(HELD_OUT)))}
    for k, v in truth.items():
        lo, hi = boot.interval(k)
        assert lo <= v <= hi, (k, v, lo, hi)
        assert lo <= boot.estimate(k) <= hi
    lo, hi = boot.interval("acc_hat")
    assert hi - lo < 0.06  # a prediction, not "somewhere between chance and 1"
    lo, hi = boot.interval("loss_hat")
    assert hi - lo < 0.05
    assert np.isfinite(boot.samples["acc_hat"]).mean() > 0.9


def test_intervals_exclude_a_held_out_run_off_the_law():
    """The checks above can fail: a ladder whose big runs fall off the law (the largest
    run is measured far above what the small ones imply) is outside the interval."""
    c, loss, acc = ladder(seed=1)
    fit = task_scaling.fit_task_law(loss, acc, compute=c)
    boot = task_scaling.bootstrap_task_law(loss, acc, compute=c, at=HELD_OUT, fit=fit,
                                           n_boot=50)
    lo, hi = boot.interval("loss_hat")
    assert not lo <= true_loss(HELD_OUT) + 0.1 <= hi


def test_params_tokens_law_recovers_the_prediction():
    """Step 1 in N and D (OLMo's form; the Chinchilla fit of lm.analysis.scaling)."""
    rng = np.random.default_rng(2)
    n = np.repeat(np.geomspace(2e7, 1e9, 4), 3)
    d = n * np.tile([10.0, 20.0, 40.0], 4)
    loss = (0.6 + 300 / n ** 0.35 + 900 / d ** 0.3) * np.exp(rng.normal(0, 0.003, n.size))
    acc = true_acc(loss) + rng.normal(0, 0.005, n.size)
    grid = {"a": [5.0, 10.0], "b": [5.0, 10.0], "e": [-1.0, 0.0], "alpha": [0.25, 0.75],
            "beta": [0.25, 0.75]}
    fit = task_scaling.fit_task_law(loss, acc, n=n, d=d, grid=grid)
    at = (4e9, 8e10)
    truth = 0.6 + 300 / at[0] ** 0.35 + 900 / at[1] ** 0.3
    assert fit.loss(at) == pytest.approx(truth, rel=0.02)
    assert fit.acc(at) == pytest.approx(true_acc(truth), abs=0.03)
    assert set(fit.params) == {"A", "alpha", "B", "beta", "E", "a", "k", "L0", "b"}


def test_too_few_runs_and_non_finite_runs():
    c, loss, acc = ladder()
    with pytest.raises(ValueError, match="3 usable runs; a task law needs at least 4"):
        task_scaling.fit_task_law(loss[:3], acc[:3], compute=c[:3])
    loss = loss.copy()
    loss[[0, 1]] = [math.nan, -1.0]
    acc[2] = math.nan
    fit = task_scaling.fit_task_law(loss, acc, compute=c)
    assert fit.n_runs == 7


# ---------------------------------------------------------------- the results store


def write_run(root, name, *, compute, tasks=None, step=1000, status="completed"):
    """A run directory as `lm train` leaves it, with task scores at `step` (tasks: a
    {task: {metric: value}} dict, or a list of (step, tasks) for several files)."""
    run = root / name
    (run / "evals").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"name": name, "model": {"d_model": 64}}))
    params = (compute / 6 / 20) ** 0.5
    (run / "summary.json").write_text(json.dumps({
        "status": status, "steps": step, "tokens_seen": 20 * params, "params": params,
        "non_embedding_params": 0.9 * params, "training_flops": compute,
        "final_val_loss": 3.0}))
    files = tasks if isinstance(tasks, list) else [(step, tasks)] if tasks else []
    for s, t in files:
        (run / "evals" / f"tasks-step{s:08d}.json").write_text(
            t if isinstance(t, str) else json.dumps({"step": s, "tasks": t}))
    return run


def test_loader_reads_the_newest_tasks_file_into_columns(tmp_path):
    old = {"hellaswag": {"acc": 0.3, "correct_bpb": 1.4}}
    new = {"hellaswag": {"acc": 0.4, "acc_norm": 0.45, "acc_stderr": 0.01,
                         "correct_bpb": 1.2, "correct_nll": 2.5, "num_choices": 4,
                         "alias": "hellaswag"},
           "arc_easy": {"acc": "nan", "correct_bpb": 1.1}}
    write_run(tmp_path, "a", compute=1e18,
              tasks=[(100, old), (2000, new), (900, old),
                     (3000, '{"step": 3000, "tasks": {"hella')])  # newest cut off mid-write
    write_run(tmp_path, "b", compute=2e18)                         # no tasks files
    assert results.task_scores(tmp_path / "a")["hellaswag"]["correct_bpb"] == 1.2
    assert results.task_scores(tmp_path / "b") == {}
    df = results.load(tmp_path).set_index("run")
    assert df.loc["a", "tasks/hellaswag/acc"] == 0.4
    assert df.loc["a", "tasks/hellaswag/acc_norm"] == 0.45
    assert df.loc["a", "tasks/hellaswag/correct_nll"] == 2.5
    assert df.loc["a", "tasks/hellaswag/num_choices"] == 4
    assert "tasks/hellaswag/alias" not in df
    assert math.isnan(df.loc["a", "tasks/arc_easy/acc"])
    assert df.loc["a", "tasks/arc_easy/correct_bpb"] == 1.1
    assert math.isnan(df.loc["b", "tasks/hellaswag/acc"])
    assert task_scaling.task_names(df) == ["hellaswag", "arc_easy"]


# ---------------------------------------------------------------- lm analyze


def synthetic_workdir(root, n_runs=len(LADDER)):
    """A ladder of runs with scores for two tasks (one with a known law), plus the
    held-out run at 1e21 FLOPs measured at the truth."""
    c, loss, acc = ladder(compute=LADDER[:n_runs])
    rng = np.random.default_rng(5)
    for i, (ci, li, ai) in enumerate([*zip(c, loss, acc),
                                      (HELD_OUT, true_loss(HELD_OUT),
                                       true_acc(true_loss(HELD_OUT)))]):
        other = {"acc": 0.5 + 0.1 * i / n_runs + rng.normal(0, 0.01),
                 "correct_bpb": 2.0 - 0.05 * i, "num_choices": 2}
        write_run(root, f"c{ci:.1e}", compute=ci, tasks={
            "hellaswag": {"acc": ai, "correct_bpb": li, "correct_nll": li * 3,
                          "num_choices": 4},
            "piqa": other})
    return root


def test_analyze_predicts_the_held_out_run(tmp_path, lm_here):
    pytest.importorskip("matplotlib")
    work = synthetic_workdir(tmp_path / "w")
    r = lm_here("analyze", "--task-scaling", "--task", "hellaswag", "--n-boot", "60",
                str(work))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "hellaswag (10 runs, chance 0.25):" in out and "piqa" not in out
    line = next(ln for ln in out.splitlines() if "held-out" in ln)
    assert line.strip().startswith("held-out c1.0e+21: predicted acc ")
    pred = float(line.split("predicted acc ")[1].split()[0])
    lo, hi = (float(v) for v in line.split("[")[1].split("]")[0].split(", "))
    measured = float(line.split("measured ")[1].split(";")[0])
    assert measured == pytest.approx(true_acc(true_loss(HELD_OUT)), abs=1e-3)
    assert lo <= measured <= hi and abs(pred - measured) < 0.02
    assert "predicted correct_bpb" in line
    assert (work / "analysis" / "task_scaling_hellaswag.png").stat().st_size > 1000
    # automatic: runs with task columns get the analysis without the flag
    r = lm_here("analyze", "--n-boot", "0", str(work))
    assert "Task scaling, two steps" in r.stdout and "piqa (10 runs, chance 0.5)" in r.stdout


def test_analyze_with_too_few_runs_is_one_line(tmp_path, lm_here):
    work = synthetic_workdir(tmp_path / "w", n_runs=3)
    r = lm_here("analyze", "--task-scaling", "--n-boot", "10", str(work))
    assert r.returncode == 0, r.stderr
    assert ("  hellaswag: not enough data: 3 usable runs besides the held-out c1.0e+21 "
            "(need 4)") in r.stdout
    assert "Traceback" not in r.stdout + r.stderr
    r = lm_here("analyze", "--task-scaling", "--task", "mmlu", str(work))
    assert r.returncode == 2 and "--task mmlu: no scores for it; tasks: hellaswag, piqa" in r.stderr
    r = lm_here("analyze", "--task-scaling", "--holdout", "nope", str(work))
    assert r.returncode == 2 and "--holdout nope" in r.stderr
    bare = tmp_path / "bare"
    write_run(bare, "r", compute=1e18)
    r = lm_here("analyze", "--task-scaling", str(bare))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "task scores" in r.stderr
    with pytest.raises(ConfigError):
        from lm.analysis.analyses import Sweep, default_options, task_scaling as run
        run(Sweep(str(bare), default_options()))
