"""N:M sparsity (lm/compress/sparsity.py): masks keep exactly N of every M weights along
each target's fan-in (magnitude and obs scores), a fixed-mask step keeps pruned weights
exactly zero whatever the optimizer does, learned masks move until freeze_at and never
after, obs and magnitude disagree where the loss's curvature says so, and bad settings
are one line, exit 2."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY, sets
from lm import config as config_lib
from lm.configs import DEFAULT_CONFIG
from lm.compress import sparsity, sparsity_prune
from lm.tree import get_path, leaf_paths

MODEL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=32",
         "model.vocab_size=64", "model.mlp.activation=swiglu", "data.seq_len=16",
         "batch_size=2", "optim.warmup_steps=0"]


def _pieces(*overrides):
    from lm.train.state import build
    cfg = config_lib.resolve(str(DEFAULT_CONFIG), [*MODEL, *overrides])
    return build(cfg)


def _batch(seed=0, b=2, t=16):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 64, (b, t + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "segment_ids": np.ones((b, t), np.int32),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
            "loss_mask": np.ones((b, t), np.float32)}


def _groups(mask, fan_in, m=4):
    """[groups, M] view of a mask along its (flattened) fan-in axes."""
    rest = tuple(i for i in range(mask.ndim) if i not in fan_in)
    return np.asarray(jnp.transpose(mask, rest + tuple(fan_in))).reshape(-1, m)


def test_masks_keep_exactly_two_of_four_along_the_fan_in_for_both_scores():
    pieces = _pieces("sparsity.mode=fixed")
    targets = pieces.sparse_targets
    assert {sparsity.dotted(p) for p in targets} == {
        f"blocks.{i}.{n}" for i in (0, 1) for n in (
            "mixer.wq", "mixer.wk", "mixer.wv", "mixer.wo",
            "channel.w_in", "channel.w_gate", "channel.w_out")}
    assert targets[("blocks", 0, "mixer", "wo")] == (0, 1)  # [heads, head_dim, embed]
    assert targets[("blocks", 0, "channel", "w_out")] == (1,)  # stored [embed, mlp]
    params = pieces.init_state()["params"]
    for score in sparsity.SCORES:
        scores = sparsity_prune.scores_for(score, pieces.cfg.sparsity, pieces, params,
                                     [_batch()], targets)
        masks = sparsity.masks_from_scores(pieces.cfg.sparsity, scores, targets)
        for path, fan_in in targets.items():
            groups = _groups(get_path(masks, path), fan_in)
            assert (groups.sum(-1) == 2).all(), (score, path)
    # The state's own masks (the init's magnitudes) hold the same pattern.
    state = pieces.init_state()
    for path, fan_in in targets.items():
        assert (_groups(get_path(state["sparsity"], path), fan_in).sum(-1) == 2).all()


def test_group_mask_runs_along_the_fan_in_not_the_fan_out():
    w = jnp.asarray([[1.0, 9.0], [2.0, 8.0], [3.0, 7.0], [4.0, 6.0]])  # [in=4, out=2]
    mask = sparsity.group_mask(jnp.abs(w), (0,), 2, 4)
    assert np.asarray(mask).tolist() == [[False, True], [False, True], [True, False],
                                         [True, False]]


def _steps(pieces, state, n, seed=0):
    step = pieces.train_step()
    out = []
    for i in range(n):
        state, metrics = step(state, pieces.global_batch(_batch(seed + i)))
        out.append((jax.tree.map(np.asarray, state), metrics))
    return state, out


def test_a_fixed_mask_step_keeps_pruned_weights_exactly_zero():
    pieces = _pieces("sparsity.mode=fixed", "optim.lr=0.05", "optim.weight_decay=0.1")
    state = pieces.init_state()
    masks = jax.tree.map(np.asarray, state["sparsity"])
    # Pruned weights start non-zero: the step must not let them act or come back.
    state, history = _steps(pieces, state, 3)
    for snapshot, metrics in history:
        assert bool(metrics["finite"])
        for path, mask in leaf_paths(masks):
            np.testing.assert_array_equal(get_path(snapshot["sparsity"], path), mask)
            w = get_path(snapshot["params"], path)
            assert (w[~mask] == 0).all(), path
            assert (w[mask] != 0).all(), path  # the kept weights train


def test_learned_masks_change_before_freeze_at_and_never_after():
    pieces = _pieces("sparsity.mode=learned", "sparsity.update_every=1",
                     "sparsity.freeze_at=3", "optim.lr=0.05")
    state = pieces.init_state()
    first = jax.tree.map(np.asarray, state["sparsity"])
    state, history = _steps(pieces, state, 6)
    flips = [float(m["mask_flips"]) for _, m in history]
    assert sum(flips[:3]) > 0 and flips[3:] == [0.0, 0.0, 0.0], flips
    changed = sum(int((a != b).sum()) for a, b in zip(
        jax.tree.leaves(history[2][0]["sparsity"]), jax.tree.leaves(first)))
    assert changed == sum(flips[:3]) or changed > 0
    frozen = history[2][0]["sparsity"]
    for snapshot, _ in history[3:]:
        jax.tree.map(np.testing.assert_array_equal, snapshot["sparsity"], frozen)
    # The dense weights keep training outside the mask (straight-through): some pruned
    # weight is non-zero, unlike mode=fixed.
    assert any((get_path(history[-1][0]["params"], p)[~m] != 0).any()
               for p, m in leaf_paths(frozen))


def test_obs_and_magnitude_disagree_where_the_curvature_says_so():
    w = jnp.asarray([[1.0], [2.0], [3.0], [4.0]])  # one group of 4 along the fan-in
    fisher = jnp.asarray([[100.0], [100.0], [1e-3], [1e-3]])
    by_magnitude = sparsity.group_mask(jnp.abs(w), (0,), 2, 4)
    by_obs = sparsity.group_mask(jnp.square(w) * fisher, (0,), 2, 4)
    assert np.asarray(by_magnitude)[:, 0].tolist() == [False, False, True, True]
    assert np.asarray(by_obs)[:, 0].tolist() == [True, True, False, False]
    # On a real model the Fisher moves some choices too.
    pieces = _pieces("sparsity.mode=fixed")
    params = pieces.init_state()["params"]
    cfg, targets = pieces.cfg.sparsity, pieces.sparse_targets
    masks = {s: sparsity.masks_from_scores(cfg, sparsity_prune.scores_for(
        s, cfg, pieces, params, [_batch()], targets), targets) for s in sparsity.SCORES}
    differ = sum(int((a != b).sum()) for a, b in zip(
        jax.tree.leaves(masks["magnitude"]), jax.tree.leaves(masks["obs"])))
    assert differ > 0


@pytest.mark.parametrize("overrides, message", [
    (["sparsity.mode=fixed", "sparsity.pattern=4:4"], "need 0 < N < M"),
    (["sparsity.mode=fixed", "sparsity.pattern=2:5"], "does not divide by M=5"),
    (["sparsity.mode=fixed", "sparsity.targets=blocks.*.mixer.nope"], "matches no parameter"),
    (["sparsity.mode=fixed", "sparsity.targets=embed"], "known fan-in"),
    (["sparsity.mode=learned", "sparsity.update_every=0"], "update_every must be positive"),
])
def test_bad_sparsity_configs_are_one_line_exit_2(lm_here, tmp_path, overrides, message):
    result = lm_here("train", "--run-dir", str(tmp_path / "run"), *sets(*TINY, *overrides))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "run").exists()


def test_bad_prune_arguments_are_one_line_exit_2(lm_here, tmp_path):
    for args, message in [
            (["--method", "2:4", "--score", "hessian"], "--score 'hessian'"),
            (["--method", "4:2"], "need 0 < N < M"),
            (["--method", "2:4", "--calib-batches", "0"], "--calib-batches"),
            (["--method", "2:4"], "has no config.json")]:
        result = lm_here("prune", str(tmp_path / "src"), "--out", str(tmp_path / "o"), *args)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], result.stderr


def test_the_section_round_trips_and_defaults_off():
    cfg = config_lib.resolve(str(DEFAULT_CONFIG), [])
    assert cfg.sparsity.mode == "off"
    on = dataclasses.replace(cfg, sparsity=dataclasses.replace(cfg.sparsity, mode="learned"))
    assert config_lib.from_json(config_lib.to_json(on)).sparsity == on.sparsity
