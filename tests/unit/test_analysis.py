"""lm.analysis: scaling-law fits recover known laws, LR sensitivity, run loading, plots.

Synthetic data come from L(N, D) = E + A/N^alpha + B/D^beta with the constants below
(close to Chinchilla's published fit), so the true answer of every fit is known."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import optimize

from lm.analysis import figures, results, scaling, stability

TRUE = dict(E=1.7, A=400.0, B=410.0, alpha=0.34, beta=0.28)
TRUE_LAW = scaling.LossLaw(**TRUE)
# A small start grid (72 starts) keeps the test to ~1 s; the default is Chinchilla's 4500.
SMALL_GRID = {"a": [0.0, 5.0, 10.0], "b": [0.0, 5.0, 10.0], "e": [0.0, 1.0],
              "alpha": [0.25, 0.75], "beta": [0.25, 0.75]}


def true_loss(n, d):
    return TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["beta"]


@pytest.fixture(scope="module")
def grid_runs():
    """10 x 10 runs, N in 1e6..1e9, D in 1e8..1e11, 1% multiplicative noise."""
    rng = np.random.default_rng(0)
    n, d = (x.ravel() for x in np.meshgrid(np.geomspace(1e6, 1e9, 10),
                                           np.geomspace(1e8, 1e11, 10)))
    loss = true_loss(n, d) * np.exp(rng.normal(0.0, 0.01, n.size))
    return n, d, loss


@pytest.fixture(scope="module")
def law_fit(grid_runs):
    return scaling.fit_loss_law(*grid_runs, grid=SMALL_GRID)


@pytest.fixture(scope="module")
def law_bootstrap(grid_runs, law_fit):
    return scaling.bootstrap_loss_law(*grid_runs, fit=law_fit, n_boot=60, seed=1,
                                      compute=[1e21])


@pytest.fixture(scope="module")
def isoflop_runs():
    """5 IsoFLOP budgets 1e17..1e21, 9 model sizes each spanning x/6..x6 around the true
    optimum, D = C / 6N, 0.2% noise."""
    rng = np.random.default_rng(0)
    n, d, c = [], [], []
    for budget in np.geomspace(1e17, 1e21, 5):
        sizes = TRUE_LAW.n_opt(budget) * np.geomspace(1 / 6, 6, 9)
        n += list(sizes)
        d += list(budget / (6 * sizes))
        c += [budget] * sizes.size
    n, d, c = np.array(n), np.array(d), np.array(c)
    loss = true_loss(n, d) * np.exp(rng.normal(0.0, 0.002, n.size))
    return n, d, c, loss


# ---------------------------------------------------------------- approach 3


def test_huber_gradient_matches_finite_differences(grid_runs):
    n, d, loss = grid_runs
    args = (np.log(n), np.log(d), np.log(loss), 1e-3)
    theta = np.array([5.0, 5.5, 0.4, 0.3, 0.3])
    _, grad = scaling.huber_objective(theta, *args)
    numeric = optimize.approx_fprime(theta, lambda t: scaling.huber_objective(t, *args)[0],
                                     1e-7)
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-7)


def test_approach3_recovers_known_law(grid_runs, law_fit):
    fit = law_fit
    assert abs(fit.alpha - TRUE["alpha"]) < 0.03
    assert abs(fit.beta - TRUE["beta"]) < 0.03
    assert abs(fit.E - TRUE["E"]) < 0.05
    assert 0.67 < fit.A / TRUE["A"] < 1.5 and 0.67 < fit.B / TRUE["B"] < 1.5
    assert abs(fit.a - TRUE_LAW.a) < 0.03
    # The optimiser found at least as good a point as the truth itself.
    n, d, loss = grid_runs
    at_truth, _ = scaling.huber_objective(TRUE_LAW.theta, np.log(n), np.log(d),
                                          np.log(loss))
    assert fit.objective <= at_truth
    assert fit.n_runs == 100


def test_bootstrap_intervals_cover_truth(law_bootstrap):
    bs = law_bootstrap
    for name, value in TRUE.items():
        lo, hi = bs.interval(name)
        assert lo <= value <= hi, (name, lo, hi, value)
    derived = {"a": TRUE_LAW.a, "b": TRUE_LAW.b, "G": TRUE_LAW.G,
               "n_opt@1e+21": TRUE_LAW.n_opt(1e21), "d_opt@1e+21": TRUE_LAW.d_opt(1e21),
               "tokens_per_param@1e+21": TRUE_LAW.tokens_per_param(1e21)}
    for name, value in derived.items():
        lo, hi = bs.interval(name)
        assert lo <= bs.estimate(name) <= hi
        assert lo <= value <= hi, (name, lo, hi, value)
    table = bs.table()
    assert {"estimate", "lo", "hi"} <= set(table.columns) and "alpha" in table.index


def test_closed_form_allocation_minimises_the_law():
    c = 1e21
    n_opt, d_opt = TRUE_LAW.optimal_allocation(c)
    assert 6 * n_opt * d_opt == pytest.approx(c, rel=1e-9)
    best = optimize.minimize_scalar(lambda x: TRUE_LAW(math.exp(x), c / (6 * math.exp(x))),
                                    bounds=(math.log(1e6), math.log(1e12)), method="bounded",
                                    options={"xatol": 1e-9})
    assert math.exp(best.x) == pytest.approx(n_opt, rel=1e-4)
    assert TRUE_LAW.tokens_per_param(c) == pytest.approx(d_opt / n_opt)
    assert TRUE_LAW.a + TRUE_LAW.b == pytest.approx(1.0)


def test_fit_drops_non_finite_runs(grid_runs):
    n, d, loss = (x[:30].copy() for x in grid_runs)
    loss[3] = math.nan
    with pytest.warns(UserWarning, match="dropping 1 of 30"):
        fit = scaling.fit_loss_law(n, d, loss, grid={"a": [5.0], "b": [5.0], "e": [0.5],
                                                     "alpha": [0.3], "beta": [0.3]})
    assert fit.n_runs == 29


# ---------------------------------------------------------------- approach 2


def test_approach2_recovers_exponent(isoflop_runs):
    n, d, c, loss = isoflop_runs
    fit = scaling.fit_isoflops(n, loss, d=d)
    assert len(fit.budgets) == 5 and all(fit.used)
    assert abs(fit.a - TRUE_LAW.a) < 0.05
    assert abs(fit.b - TRUE_LAW.b) < 0.05
    np.testing.assert_allclose(fit.n_opts, TRUE_LAW.n_opt(fit.compute), rtol=0.35)
    # Grouping by given compute gives the same budgets as grouping 6ND.
    fit_c = scaling.fit_isoflops(n, loss, compute=c)
    assert fit_c.a == pytest.approx(fit.a, rel=1e-6)


def test_group_budgets_tolerates_rounding():
    c = np.array([1e18, 1.02e18, 0.99e18, 1e19, 1.01e19])
    labels = scaling.group_budgets(c, rtol=0.05)
    assert np.unique(labels).size == 2
    assert labels[0] == labels[1] == labels[2]


# ---------------------------------------------------------------- stability


def test_lr_sensitivity_hand_computed():
    lrs = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
    # capped at L_init = 5: [3.0, 2.5, 2.8, 5 (7.0 > L_init), 5 (diverged)]; L* = 2.5
    losses = [3.0, 2.5, 2.8, 7.0, math.nan]
    expected = (0.5 + 0.0 + 0.3 + 2.5 + 2.5) / 5
    assert stability.lr_sensitivity(lrs, losses, loss_init=5.0) == pytest.approx(expected)
    # inf counts as diverged; repeated LRs (seeds) are averaged first.
    assert stability.lr_sensitivity([1, 1, 2], [2.0, 3.0, math.inf], 4.0) == \
        pytest.approx(((2.5 - 2.5) + (4.0 - 2.5)) / 2)
    assert math.isnan(stability.lr_sensitivity([1, 2], [math.nan, math.inf], 4.0))


# ---------------------------------------------------------------- results


def _write_run(run, *, lr, d_model, summary=None, metrics=()):
    run.mkdir(parents=True)
    config = {"name": run.name, "steps": 100, "batch_size": 32, "seed": 0,
              "model": {"d_model": d_model, "n_layers": 2, "vocab_size": 259},
              "optim": {"lr": lr, "schedule": "cosine"},
              "data": {"seq_len": 128}, "mesh": {"data": -1}}
    (run / "config.json").write_text(json.dumps(config, indent=2))
    if summary is not None:
        (run / "summary.json").write_text(summary if isinstance(summary, str)
                                          else json.dumps(summary))
    (run / "metrics.jsonl").write_text("".join(
        (m if isinstance(m, str) else json.dumps(m)) + "\n" for m in metrics))


def _summary(status, steps, loss):
    return {"status": status, "steps": steps, "tokens_seen": steps * 4096, "params": 1000,
            "non_embedding_params": 900, "flops_per_token": 6000.0,
            "training_flops": 6000.0 * steps * 4096, "final_val_loss": loss,
            "best_val_loss": loss, "final_val_bpb": loss / math.log(2)}


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    train = {"kind": "train", "loss": 3.0, "logz_mean": 5.5,
             "attn_logit_max/0": 1.0, "attn_logit_max/1": 2.0}
    _write_run(root / "lr1e-3", lr=1e-3, d_model=64, summary=_summary("completed", 100, 2.0),
               metrics=[{"step": 10, **train}, {"step": 10, "kind": "eval", "loss": 2.9},
                        {"step": 20, **train, "attn_logit_max/1": 4.5}])
    # killed before its first summary.json, mid-way through a metrics line
    _write_run(root / "lr3e-3", lr=3e-3, d_model=64, summary=None,
               metrics=[{"step": 10, **train}, '{"step": 20, "kind": "tr'])
    # diverged: the summary keeps the last good eval; metrics carry "nan" strings
    _write_run(root / "big" / "lr1e-2", lr=1e-2, d_model=64,
               summary=_summary("diverged at step 30", 30, 2.2),
               metrics=[{"step": 10, **train},
                        {"step": 20, **train, "loss": "nan", "attn_logit_max/0": "nan",
                         "logz_mean": "inf"}])
    # a partly written summary counts as missing; checkpoints/ is not searched
    _write_run(root / "lr3e-2", lr=3e-2, d_model=64, summary='{"status": "comp')
    (root / "lr3e-2" / "checkpoints" / "10").mkdir(parents=True)
    (root / "lr3e-2" / "checkpoints" / "10" / "config.json").write_text("{}")
    return root


def test_load_flattens_and_marks_status(sweep):
    df = results.load(sweep).set_index("run")
    assert sorted(df.index) == ["big/lr1e-2", "lr1e-3", "lr3e-2", "lr3e-3"]
    assert df.loc["lr1e-3", "status"] == "completed"
    assert df.loc["lr3e-3", "status"] == "missing"
    assert df.loc["lr3e-2", "status"] == "missing"
    assert df.loc["big/lr1e-2", "status"] == "diverged at step 30"
    assert df.loc["big/lr1e-2", "diverged_step"] == 30
    assert df["diverged_step"].isna().sum() == 3
    assert df.loc["lr3e-3", "optim.lr"] == 3e-3
    assert (df["model.d_model"] == 64).all() and "data.seq_len" in df
    assert df.loc["lr1e-3", "final_val_loss"] == 2.0
    assert math.isnan(df.loc["lr3e-3", "final_val_loss"])
    assert df.loc["lr1e-3", "steps"] == 100            # planned (config)
    assert df.loc["big/lr1e-2", "summary.steps"] == 30  # done (summary)
    assert df.loc["lr1e-3", "path"] == str(sweep / "lr1e-3")


def test_load_empty_and_absent(tmp_path):
    assert len(results.load(tmp_path)) == 0
    with pytest.raises(FileNotFoundError):
        results.load(tmp_path / "nope")


def test_metrics_and_stability_curves(sweep):
    m = results.metrics(sweep / "lr1e-3")
    assert list(m["kind"]) == ["train", "eval", "train"]
    assert m["step"].tolist() == [10, 10, 20]
    assert results.metrics(sweep / "lr3e-3")["step"].tolist() == [10]  # cut-off line skipped
    bad = results.metrics(sweep / "big" / "lr1e-2")
    assert math.isnan(bad["loss"].iloc[1]) and bad["logz_mean"].iloc[1] == math.inf
    curves = stability.stability_curves(sweep / "lr1e-3")
    assert curves["step"].tolist() == [10, 20]
    assert curves["attn_logit_max"].tolist() == [2.0, 4.5]
    assert curves["logz_mean"].tolist() == [5.5, 5.5]
    assert math.isnan(stability.stability_curves(bad)["attn_logit_max"].iloc[1])
    assert len(results.metrics(sweep / "lr3e-2")) == 0


def test_lr_sensitivity_table_counts_diverged_runs(sweep):
    df = results.load(sweep)
    table = stability.lr_sensitivity_table(df, by="model.d_model", loss_init=5.0)
    row = table.iloc[0]
    # completed 2.0 and diverged (its summary's 2.2 ignored -> 5.0); missing runs left out
    assert row["lr_sensitivity"] == pytest.approx((0.0 + 3.0) / 2)
    assert row["n_diverged"] == 1 and row["n_lrs"] == 2 and row["best_lr"] == 1e-3
    default = stability.lr_sensitivity_table(df, by=["model.d_model"])
    assert default["loss_init"].iloc[0] == pytest.approx(math.log(259))


# ---------------------------------------------------------------- plots


def _is_png(path):
    return path.exists() and path.stat().st_size > 1000 and \
        path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_write_pngs(tmp_path, isoflop_runs, grid_runs, law_fit, sweep):
    pytest.importorskip("matplotlib")
    n, d, _, loss = isoflop_runs
    assert _is_png(scaling.plot_isoflops(scaling.fit_isoflops(n, loss, d=d),
                                         tmp_path / "iso.png"))
    assert _is_png(scaling.plot_loss_law(law_fit, *grid_runs, tmp_path / "law.png"))
    df = results.load(sweep)
    assert _is_png(figures.lr_panels(df, tmp_path / "plots" / "lr.png", panel="none",
                                     colour="model.d_model", loss_init=5.0))


def test_package_level_load_is_the_results_loader(tmp_path):
    import lm.analysis
    run = tmp_path / "r1"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": {"d_model": 48}}))
    (run / "summary.json").write_text(json.dumps({"status": "completed", "final_val_loss": 2.5}))
    df = lm.analysis.load(tmp_path)
    assert df["model.d_model"].tolist() == [48]
    assert df["final_val_loss"].tolist() == [2.5]
    # Fields the run's config predates come back with their defaults.
    assert df["model.mixer_pattern"].tolist() == ["a"]


def test_residual_growth_reads_the_last_train_record(tmp_path):
    train = {"kind": "train", "loss": 3.0}
    _write_run(tmp_path / "a", lr=1e-3, d_model=64, summary=_summary("completed", 20, 2.0),
               metrics=[{"step": 10, **train, "resid_rms/0": 1.0, "resid_rms/1": 2.0},
                        {"step": 20, **train, "resid_rms/0": 1.5, "resid_rms/1": 6.0,
                         "resid_rms/10": 9.0},
                        {"step": 20, "kind": "eval", "loss": 2.0}])
    _write_run(tmp_path / "b", lr=1e-2, d_model=64, summary=_summary("completed", 20, 2.5),
               metrics=[{"step": 20, **train}])  # logged no residual RMS
    np.testing.assert_allclose(stability.residual_growth(tmp_path / "a"), [1.5, 6.0, 9.0])
    assert stability.residual_growth(tmp_path / "b").size == 0
    runs = results.load(tmp_path)
    table = stability.residual_growth_table(runs, ["optim.lr"])
    assert table["optim.lr"].tolist() == [1e-3]
    assert table["growth"].tolist() == [6.0] and table["profile"].tolist() == ["1.5 6 9"]
    path = stability.plot_residual_growth(table, tmp_path / "g.png", label=["optim.lr"])
    assert path.stat().st_size > 1000


# ---------------------------------------------------------------- lm analyze's registry


@pytest.fixture
def registry(monkeypatch):
    """lm.analysis.analyses with a private copy of the registry (plug-ins added here
    leave the real one alone)."""
    from lm.analysis import analyses
    monkeypatch.setattr(analyses, "ANALYSES", list(analyses.ANALYSES))
    return analyses


def test_a_registered_analysis_runs_when_it_applies_with_its_own_option(sweep, registry,
                                                                        lm_here):
    registry.register(registry.Analysis(
        "run-count", lambda s: print(f"\n{len(s.finished)} finished of {len(s.runs)}"),
        applies=lambda s: len(s.runs) >= s.options.min_runs, when="--min-runs runs",
        options=lambda p: p.add_argument("--min-runs", type=int, default=2)))
    registry.register(registry.Analysis("hello", lambda s: print(f"hello {s.workdir}"),
                                        flag="hello", help="greet the workdir"))
    r = lm_here("analyze", str(sweep))
    assert r.returncode == 0, r.stderr
    # The built-in LR analysis first (the sweep varies optim.lr), then the plug-in.
    assert r.stdout.index("LR sensitivity") < r.stdout.index("\n2 finished of 4\n")
    r = lm_here("analyze", "--min-runs", "5", str(sweep))
    assert "finished of" not in r.stdout
    r = lm_here("analyze", "--hello", str(sweep))  # on request: that analysis alone
    assert (r.returncode, r.stdout) == (0, f"hello {sweep}\n")
    with pytest.raises(ValueError, match="registered already"):
        registry.register(registry.Analysis("hello", print, flag="hi"))
    with pytest.raises(TypeError):
        registry.Analysis("neither", print)


def test_nothing_to_analyze_names_what_each_analysis_needs(tmp_path, registry):
    for n_layers in (2, 3):
        run = tmp_path / f"l{n_layers}"
        _write_run(run, lr=1e-3, d_model=64, summary=_summary("completed", 100, 2.0))
        config = json.loads((run / "config.json").read_text())
        config["model"]["n_layers"] = n_layers
        (run / "config.json").write_text(json.dumps(config))
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert registry.analyze(str(tmp_path)) == 0
    lines = out.getvalue().splitlines()
    assert lines[0] == "2 runs (2 finished); varying: model.n_layers"
    assert lines[1].startswith("nothing to analyze: ")
    for a in registry.ANALYSES:
        assert (f"{a.name} needs {a.when}" in lines[1]) == (a.applies is not None)
