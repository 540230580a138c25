"""Batched trials (lm/train/trials.py): K trials as one vmapped program reproduce the
same trials alone, mask a diverging one, resume as a group; the sweep runner groups
compatible trials; the group step compiles for a TPU topology."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, train_losses

from lm import config as config_lib
from lm.config import ConfigError
from lm.configs import DEFAULT_CONFIG

GROUP = [o for o in TINY if not o.startswith(("steps=", "checkpoint_every=", "eval_every="))] + [
    "steps=6", "checkpoint_every=3", "eval_every=6", "log_every=1", "tensorboard=false"]


def cfg(*extra: str):
    return config_lib.apply_overrides(config_lib.load_config_file(DEFAULT_CONFIG),
                                      [*GROUP, *extra])


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="module")
def batched_and_alone(tmp_path_factory):
    """Three trials that differ in LR, seed (init and data order), warmup, weight decay,
    z-loss and init scale, one of which diverges (LR 1e30), trained as one group and
    each alone."""
    from lm.train.loop import train
    from lm.train.trials import train_group
    root = tmp_path_factory.mktemp("trials")
    cfgs = [cfg("name=a", "optim.lr=1e-3", "seed=0"),
            cfg("name=b", "optim.lr=4e-3", "seed=1", "optim.z_loss=1e-3",
                "optim.warmup_steps=3", "optim.weight_decay=0.05", "model.init_std=0.03"),
            cfg("name=c", "optim.lr=1e30", "seed=2")]
    codes = train_group(cfgs, [root / "group" / c.name for c in cfgs])
    alone = {c.name: train(c, root / "alone" / c.name) for c in cfgs}
    return root, codes, alone


def test_batched_trials_reproduce_each_trial_alone(batched_and_alone):
    root, codes, alone = batched_and_alone
    for name in ("a", "b"):
        g, a = train_losses(root / "group" / name), train_losses(root / "alone" / name)
        assert sorted(g) == sorted(a) == list(range(1, 7))
        np.testing.assert_allclose([g[s] for s in a], [a[s] for s in a], rtol=0, atol=1e-5)
        sg, sa = summary(root / "group" / name), summary(root / "alone" / name)
        assert sg["status"] == sa["status"] == "completed"
        assert sg["final_val_loss"] == pytest.approx(sa["final_val_loss"], abs=1e-5)
        assert sg["batched_with"] == ["a", "b", "c"]
        # What lm analyze --optimizers reads, as a lone run records it.
        assert sg["optimizer_state_bytes_per_param"] == sa["optimizer_state_bytes_per_param"]
    # The losses of a and b differ (each trial really got its own values).
    assert train_losses(root / "group" / "a")[6] != train_losses(root / "group" / "b")[6]


def test_a_diverging_trial_is_masked_and_the_others_go_on(batched_and_alone):
    root, codes, alone = batched_and_alone
    assert codes == [0, 0, 3] and alone["c"] == 3
    sg, sa = summary(root / "group" / "c"), summary(root / "alone" / "c")
    assert sg["status"].startswith("diverged at step ")
    assert sg["status"] == sa["status"] and sg["steps"] == sa["steps"]
    assert sorted(train_losses(root / "group" / "c")) == sorted(train_losses(root / "alone" / "c"))
    # Its last good checkpoint is kept, none after the divergence.
    bad = int(sg["status"].split()[-1])
    assert all(int(p.name) < bad for p in (root / "group" / "c" / "checkpoints").iterdir())


def test_a_trial_of_a_group_resumes_alone(batched_and_alone, tmp_path):
    """A trial's run dir is an ordinary run dir: `lm train` on it alone finds the run
    complete, `lm eval` reads its checkpoint."""
    from lm.train.param_source import restore_for_inference
    root, _, _ = batched_and_alone
    setup, params, step = restore_for_inference(root / "group" / "b")
    assert step == 6 and setup.cfg.optim.lr == 4e-3


def test_group_resumes_mid_run_like_the_uninterrupted_group(tmp_path, monkeypatch):
    """Shared data order (one data.seed); SIGTERM at step 4: the group checkpoints and
    stops; rerun, it resumes at 4 and ends as the uninterrupted group does."""
    from lm.train.trials import train_group
    cfgs = [cfg("name=x", "optim.lr=2e-3", "seed=3", "data.seed=7"),
            cfg("name=y", "optim.lr=6e-3", "seed=4", "data.seed=7")]
    ref = train_group(cfgs, [tmp_path / "ref" / c.name for c in cfgs])
    assert ref == [0, 0]
    monkeypatch.setenv("LMLAB_FAULT", "sigterm@4")
    first = train_group(cfgs, [tmp_path / "run" / c.name for c in cfgs])
    assert first == [128 + signal.SIGTERM] * 2
    assert summary(tmp_path / "run" / "x")["status"] == "interrupted"
    monkeypatch.delenv("LMLAB_FAULT")
    assert train_group(cfgs, [tmp_path / "run" / c.name for c in cfgs]) == [0, 0]
    for name in ("x", "y"):
        r, g = train_losses(tmp_path / "ref" / name), train_losses(tmp_path / "run" / name)
        assert sorted(g) == list(range(1, 7))
        np.testing.assert_allclose([g[s] for s in r], [r[s] for s in r], rtol=0, atol=1e-6)
        assert summary(tmp_path / "run" / name)["status"] == "completed"


def test_trials_that_differ_in_shape_are_refused_in_one_line(tmp_path):
    from lm.train.trials import make_group
    with pytest.raises(ConfigError, match="model.d_model"):
        make_group([cfg("name=a"), cfg("name=b", "model.d_model=64")])


def test_grouping_keeps_shapes_apart_and_caps_the_size():
    from lm.train.trials import group_configs
    cfgs = [cfg(f"optim.lr={lr}", f"model.qk_norm={qk}", f"seed={s}")
            for qk in ("false", "true") for lr in (1e-3, 1e-2) for s in (0, 1)]
    assert group_configs(cfgs, 3) == [[0, 1, 2], [3], [4, 5, 6], [7]]
    assert group_configs(cfgs, 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_sweep_dry_run_shows_the_groups(tmp_path, lm_here):
    spec = tmp_path / "spec.py"
    spec.write_text(
        "from lm.sweep import Grid, Sweep\n"
        "def sweep():\n"
        f"    return Sweep(overrides={GROUP!r}, arms={{'base': {{}}, 'qk': {{'model.qk_norm': True}}}},\n"
        "                 axes=[Grid('optim.lr', [1e-3, 1e-2])], seeds=2, batch=8)\n")
    r = lm_here("sweep", str(spec), "--workdir", str(tmp_path / "w"), "--dry-run")
    code, out, err = r.returncode, r.stdout, r.stderr
    assert code == 0, err
    assert "group g000: 4 trials as one program: arm=base,lr=1e-3,seed=0" in out
    assert "8 trials in 2 processes (2 batched groups; --batch 8)" in out
    r = lm_here("sweep", str(spec), "--workdir", str(tmp_path / "w"), "--dry-run", "--batch", "1")
    assert r.returncode == 0 and "8 trials in 8 processes (0 batched groups" in r.stdout
    r = lm_here("sweep", str(spec), "--workdir", str(tmp_path / "w"), "--batch", "0")
    assert r.returncode == 2 and "--batch must be >= 1" in r.stderr


def test_group_step_compiles_for_a_tpu_slice_with_trials_over_chips():
    """On a v5p 2x2x1 slice with mesh data=4, 4 trials spread one per chip: each chip
    holds one trial's state (not all four)."""
    from lm.compile import parse_topology, topology_devices
    from lm.parallel.mesh import make_mesh
    from lm.parallel.sharding import per_device_bytes
    from lm.train.trials import make_group
    devices = topology_devices(parse_topology("v5p:2x2x1"))
    mesh = make_mesh(cfg().mesh, devices)  # data=-1: all four chips
    one = cfg("batch_size=8")
    group = make_group([cfg("batch_size=8", f"seed={i}", f"name=t{i}") for i in range(4)], mesh=mesh)
    assert group.axes == ("data",)
    state = group.abstract_state()
    compiled = group.step_fn().trace(state, group.abstract_values(),
                                     group.abstract_batch()).lower().compile()
    assert compiled.memory_analysis().argument_size_in_bytes > 0
    from lm.train.setup import setup_run
    alone = setup_run(one, make_mesh(one.mesh, devices[:1])).pieces.abstract_state()
    assert per_device_bytes(state["trials"]) == per_device_bytes(alone)


@pytest.mark.slow
def test_lm_sweep_batch_runs_a_group_and_accounts_for_each_trial(tmp_path):
    """The real `lm sweep --batch`: one `lm train-group` process for two trials, one of
    which diverges; each trial's status is its own; a rerun skips both."""
    from conftest import lm
    spec = tmp_path / "spec.py"
    spec.write_text(
        "from lm.sweep import Grid, Sweep\n"
        "def sweep():\n"
        f"    return Sweep(overrides={GROUP + ['optim.clip_norm=0']!r},\n"
        "                 axes=[Grid('optim.lr', [1e-3, 1e30])])\n")
    work = tmp_path / "w"
    result = lm("sweep", str(spec), "--workdir", str(work), "--batch", "4")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "batched: 2 trials in 1 processes" in result.stdout
    assert summary(work / "lr=1e-3")["status"] == "completed"
    assert summary(work / "lr=1e30")["status"].startswith("diverged at step ")
    assert "1 completed, 1 diverged" in result.stdout
    assert (work / "groups" / "g000.log").read_text().count("trials batched as one program") == 1
    again = lm("sweep", str(spec), "--workdir", str(work), "--batch", "4")
    assert again.returncode == 0 and "2 skipped" in again.stdout


def test_experiment_specs_expand_into_batched_groups():
    """The stability studies: their grids are what their docstrings say, and every
    (width, arm) pair / width is one batched group."""
    from lm.config import exec_python_file
    from lm.sweep import expand
    from lm.sweep.runner import plan_groups
    root = Path(__file__).resolve().parents[2] / "experiments"
    for name, trials, groups in (("lr_sensitivity", 210, 6), ("warmup_sensitivity", 140, 2)):
        sweep = exec_python_file(root / f"{name}.py", "sweep spec").sweep()
        expanded = expand(sweep)
        assert len(expanded) == trials
        lrs = sorted({t.tags["optim.lr"] for t in expanded})
        assert lrs[0] == 1e-3 and lrs[-1] == 1.0 and len(lrs) == 7
        assert len(plan_groups(expanded, sweep, sweep.batch)) == groups


def test_fine_tunes_are_not_batched_and_say_why():
    from lm.train.trials import group_configs, make_group
    cfgs = [cfg("seed=0"), cfg("seed=1", "lora.rank=4"), cfg("seed=2")]
    assert group_configs(cfgs, 8) == [[0, 2], [1]]
    with pytest.raises(ConfigError, match="do not support lora"):
        make_group([cfgs[1]])
