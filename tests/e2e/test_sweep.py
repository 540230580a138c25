"""Sweeps: spec expansion, validation, a tiny real sweep with a diverging trial, rerun
skipping, `lm results`, `lm analyze`, `lm sweep --dry-run`."""

from __future__ import annotations

import json
import textwrap

import pytest
from conftest import ROOT, TINY, lm

from lm.config import ConfigError, TrainConfig
from lm.sweep import Grid, LogUniform, Sweep, Zip, expand


def test_expansion_count_order_and_names():
    sweep = Sweep(
        base=TrainConfig(),
        axes=[Grid("optim.lr", [1e-3, 3e-2]),
              Zip({"model.d_model": [64, 128], "model.n_heads": [2, 4]})],
        arms={"baseline": {}, "qk_norm": {"model.qk_norm": True}},
        sizes={"s": {"model.n_layers": 2}, "m": {"model.n_layers": 4}},
    )
    trials = expand(sweep)
    assert len(trials) == 2 * 2 * 2 * 2
    assert trials[0].name == "arm=baseline,size=s,lr=1e-3,d_model=64,n_heads=2"
    assert trials[-1].name == "arm=qk_norm,size=m,lr=0.03,d_model=128,n_heads=4"
    assert len({t.name for t in trials}) == len(trials)
    assert "model.qk_norm=true" in trials[-1].overrides
    assert [t.name for t in expand(sweep)] == [t.name for t in trials]  # deterministic


def test_log_uniform_is_reproducible():
    a = LogUniform("optim.lr", 1e-4, 1e-1, 6, seed=3).points()
    assert a == LogUniform("optim.lr", 1e-4, 1e-1, 6, seed=3).points()
    assert a != LogUniform("optim.lr", 1e-4, 1e-1, 6, seed=4).points()
    assert all(1e-4 <= p["optim.lr"] <= 1e-1 for p in a) and len(a) == 6


def test_zip_length_mismatch_and_invalid_trial():
    with pytest.raises(ConfigError, match="differ in length"):
        expand(Sweep(base=TrainConfig(), axes=[Zip({"model.d_model": [1, 2], "seed": [1]})]))
    with pytest.raises(ConfigError, match=r"trial d_model=30: model.d_model=30 is not divisible"):
        expand(Sweep(base=TrainConfig(), axes=[Grid("model.d_model", [64, 30])]))


def _spec(tmp_path, body: str):
    path = tmp_path / "spec.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_invalid_trial_exits_2_with_one_line(tmp_path, lm_here):
    spec = _spec(tmp_path, """
        from lm.sweep import Grid, Sweep
        def sweep():
            return Sweep(axes=[Grid("model.n_kv_heads", [1, 3])])
    """)
    result = lm_here("sweep", spec, "--workdir", str(tmp_path / "w"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "trial n_kv_heads=3" in lines[0] and "model.n_kv_heads" in lines[0]
    assert not (tmp_path / "w").exists()


def test_dry_run_prints_commands(tmp_path, lm_here):
    spec = _spec(tmp_path, f"""
        from lm.sweep import Grid, Sweep
        def sweep():
            return Sweep(overrides={TINY!r}, axes=[Grid("optim.lr", [1e-3, 1e-2])])
    """)
    result = lm_here("sweep", spec, "--workdir", str(tmp_path / "w"), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "lr=1e-3\n" in result.stdout and "lr=0.01\n" in result.stdout
    assert "-m lm.cli train --config" in result.stdout and "--set optim.lr=0.01" in result.stdout
    assert not (tmp_path / "w").exists()


def test_prepare_runs_once_before_the_trials_that_read_it(tmp_path, lm_here):
    """A spec's prepare(workdir, smoke) runs under the lock before the trials are expanded,
    and sweep(workdir=...) reads what it wrote (here: the LR of the trials); a dry run
    prepares nothing. The trial is marked finished so nothing trains."""
    spec = _spec(tmp_path, f"""
        import json
        from lm.sweep import Sweep
        def prepare(workdir, smoke):
            n = json.loads((workdir / "made.json").read_text())["n"] + 1 if (
                workdir / "made.json").exists() else 1
            (workdir / "made.json").write_text(json.dumps({{"n": n, "lr": 0.02}}))
        def sweep(smoke=False, workdir=None):
            made = workdir / "made.json"
            lr = json.loads(made.read_text())["lr"] if made.exists() else 0.01
            return Sweep(overrides={TINY!r}, arms={{"a": {{"optim.lr": lr}}}})
    """)
    work = tmp_path / "w"
    dry = lm_here("sweep", spec, "--workdir", str(work), "--dry-run")
    assert dry.returncode == 0 and "--set optim.lr=0.01" in dry.stdout
    assert not work.exists()
    (work / "arm=a").mkdir(parents=True)
    (work / "arm=a" / "summary.json").write_text('{"status": "completed"}')
    for n in (1, 2):
        result = lm_here("sweep", spec, "--workdir", str(work))
        assert result.returncode == 0, result.stderr
        assert json.loads((work / "made.json").read_text())["n"] == n
        trials = json.loads((work / "sweep.json").read_text())["trials"]
        assert "optim.lr=0.02" in trials[0]["overrides"]
        assert "skip arm=a: completed" in result.stdout


NAMES = ["lr=1e-3,clip_norm=1", "lr=3e-3,clip_norm=1", "lr=1e30,clip_norm=0"]


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """A 3-trial sweep, one of which (lr=1e30, no clipping) diverges: (spec, workdir, result)."""
    tmp = tmp_path_factory.mktemp("sweep")
    spec = _spec(tmp, f"""
        from lm.sweep import Sweep, Zip
        def sweep():
            return Sweep(overrides={TINY!r} + ["steps=4", "eval_every=4", "log_every=2",
                                              "tensorboard=false"],
                         axes=[Zip({{"optim.lr": [1e-3, 3e-3, 1e30],
                                     "optim.clip_norm": [1.0, 1.0, 0.0]}})])
    """)
    work = tmp / "w"
    return spec, work, lm("sweep", spec, "--workdir", str(work), "--parallel", "2")


@pytest.mark.slow
def test_tiny_sweep_records_divergence_and_rerun_skips(tiny_sweep):
    spec, work, result = tiny_sweep
    assert result.returncode == 0, result.stdout + result.stderr
    status = {n: json.loads((work / n / "summary.json").read_text())["status"] for n in NAMES}
    assert status[NAMES[0]] == status[NAMES[1]] == "completed"
    assert status[NAMES[2]].startswith("diverged at step")
    assert "2 completed, 1 diverged" in result.stdout
    trials = json.loads((work / "sweep.json").read_text())["trials"]
    assert [t["name"] for t in trials] == NAMES

    mtimes = {n: (work / n / "summary.json").stat().st_mtime_ns for n in NAMES}
    again = lm("sweep", spec, "--workdir", str(work))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "0 to run, 3 already done" in again.stdout
    assert {n: (work / n / "summary.json").stat().st_mtime_ns for n in NAMES} == mtimes


@pytest.mark.slow
def test_results_and_analyze(tiny_sweep):
    _, work, result = tiny_sweep
    assert result.returncode == 0, result.stdout + result.stderr
    table = lm("results", str(work))
    assert table.returncode == 0, table.stderr
    assert "final_val_loss" in table.stdout and "lr" in table.stdout
    assert "diverged at step" in table.stdout and table.stdout.count("completed") >= 2

    analysis = lm("analyze", str(work))
    assert analysis.returncode == 0, analysis.stdout + analysis.stderr
    assert "lr_sensitivity" in analysis.stdout
    assert (work / "analysis" / "lr_sweep.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("notebook", ["stability.ipynb", "scaling_curves.ipynb"])
def test_notebooks_run_on_a_sweep(tiny_sweep, notebook, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("ipykernel")
    _, work, result = tiny_sweep
    assert result.returncode == 0, result.stdout + result.stderr
    monkeypatch.setenv("LM_SWEEP_DIR", str(work))
    monkeypatch.setenv("LM_N_BOOT", "5")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(ROOT / "notebooks" / notebook, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # committed clean
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(work)}}).execute()


def test_results_of_missing_dir_is_one_line(tmp_path, lm_here):
    result = lm_here("results", str(tmp_path / "nope"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_trials_handed_to_lm_launch(tmp_path):
    """--launch runs each trial as `lm launch <args> -- train ...` (here a one-process
    local pod) and the sweep reads its exit code and summary like a local trial's."""
    spec = _spec(tmp_path, f"""
        from lm.sweep import Grid, Sweep
        def sweep():
            return Sweep(overrides={TINY!r} + ["steps=2", "eval_every=2", "log_every=1",
                                               "checkpoint_every=2"],
                         axes=[Grid("optim.lr", [1e-3])])
    """)
    work = tmp_path / "w"
    result = lm("sweep", spec, "--workdir", str(work), "--launch", "local --processes 1")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "1 completed" in result.stdout
    trial = json.loads((work / "sweep.json").read_text())["trials"][0]
    i = trial["command"].index("launch")
    assert trial["command"][i:i + 5] == ["launch", "local", "--processes", "1", "--"]
    assert json.loads((work / "lr=1e-3" / "summary.json").read_text())["status"] == "completed"
