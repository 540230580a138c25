"""Knowledge distillation (lm/compress): the KD loss against a hand-computed KL, zero
loss and gradient when the teacher is the student, a teacher that gets no gradient and
no optimizer state, and the teachers refused before anything is written."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, assert_train_refused
from flax import nnx

from lm import config as config_lib
from lm.compress.distill import DistillConfig, Plan, kd_per_token
from lm.config import ConfigError, resolve
from lm.model import Transformer
from lm.train.step import loss_sums


def _batch(cfg, vocab=259, seed=0):
    rng = np.random.default_rng(seed)
    b, t = 4, cfg.data.seq_len
    return {"inputs": jnp.asarray(rng.integers(0, vocab, (b, t)), jnp.int32),
            "targets": jnp.asarray(rng.integers(0, vocab, (b, t)), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
            "segment_ids": jnp.ones((b, t), jnp.int32),
            "loss_mask": jnp.asarray(rng.random((b, t)) < 0.9, jnp.float32)}


def _model(*extra, seed=0):
    cfg = resolve("configs/default.py", TINY + ["model.vocab_size=259", *extra])
    graphdef, params = nnx.split(Transformer(cfg.model, nnx.Rngs(params=seed)), nnx.Param)
    return cfg, graphdef, params


def _kl(p, q):
    return float(np.sum(p * (np.log(p) - np.log(q))))


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kd_loss_is_the_hand_computed_kl_times_t_squared(temperature):
    s = np.array([1.0, -0.5, 2.0, 0.0], np.float64)
    t = np.array([0.3, 1.2, -1.0, 0.4], np.float64)
    p_s, p_t = _softmax(s / temperature), _softmax(t / temperature)
    for kind, want in (("forward_kl", _kl(p_t, p_s)), ("reverse_kl", _kl(p_s, p_t))):
        got = kd_per_token(jnp.asarray(s, jnp.float32)[None, None],
                           jnp.asarray(t, jnp.float32)[None, None], temperature, kind)
        assert got.shape == (1, 1)
        np.testing.assert_allclose(float(got[0, 0]), temperature ** 2 * want, rtol=1e-5)
    # Forward and reverse differ on this case (the test tells them apart).
    assert abs(_kl(p_t, p_s) - _kl(p_s, p_t)) > 1e-3


@pytest.mark.parametrize("loss_chunk", [0, 8])
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
def test_a_teacher_equal_to_the_student_gives_zero_kd_loss_and_gradient(kind, loss_chunk):
    cfg, graphdef, params = _model()
    batch = _batch(cfg)
    dcfg = DistillConfig(teacher="x", weight=1.0, temperature=1.0, kind=kind)
    teacher = (graphdef, jax.tree.map(jnp.copy, params), dcfg, Plan(), None)
    grads, stats = jax.grad(loss_sums, argnums=1, has_aux=True)(
        graphdef, params, batch, 0.0, jnp.sum(batch["loss_mask"]), loss_chunk, teacher)
    assert abs(float(stats["kd_loss"])) < 1e-6
    assert float(stats["loss"]) > 1.0  # the data loss is there, but weighted 0
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) < 1e-6
    # Not trivially zero: another teacher gives a loss and a gradient.
    _, _, other = _model(seed=1)
    grads, stats = jax.grad(loss_sums, argnums=1, has_aux=True)(
        graphdef, params, batch, 0.0, jnp.sum(batch["loss_mask"]), loss_chunk,
        (graphdef, other, dcfg, Plan(), None))
    assert float(stats["kd_loss"]) > 1e-4
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) > 1e-6


def test_kd_loss_of_a_step_is_the_masked_mean_of_the_per_token_kl_and_chunks_agree():
    cfg, graphdef, params = _model()
    _, t_graphdef, t_params = _model("model.d_model=48", "model.n_heads=3", seed=3)
    batch = _batch(cfg)
    dcfg = DistillConfig(teacher="x", weight=0.3, temperature=2.0, kind="reverse_kl")
    denom = jnp.sum(batch["loss_mask"])
    loss0, st0 = loss_sums(graphdef, params, batch, 0.0, denom, 0, (t_graphdef, t_params, dcfg, Plan(), None))
    loss8, st8 = loss_sums(graphdef, params, batch, 0.0, denom, 8, (t_graphdef, t_params, dcfg, Plan(), None))
    s_logits, _ = nnx.merge(graphdef, params)(batch["inputs"])
    t_logits, _ = nnx.merge(t_graphdef, t_params)(batch["inputs"])
    kd = kd_per_token(s_logits, t_logits, 2.0, "reverse_kl")
    want = float(jnp.sum(kd * batch["loss_mask"]) / denom)
    np.testing.assert_allclose(float(st0["kd_loss"]), want, rtol=1e-5)
    np.testing.assert_allclose(float(st8["kd_loss"]), want, rtol=1e-5)
    np.testing.assert_allclose(float(loss0), 0.7 * float(st0["loss"]) + 0.3 * want, rtol=1e-5)
    np.testing.assert_allclose(float(loss8), float(loss0), rtol=1e-5)


def test_the_teacher_gets_no_gradient_and_no_optimizer_state(tmp_path):
    """A train step with a teacher: the optimizer state has the student's tree alone,
    the teacher's params come out unchanged (not donated, not updated), and the gradient
    of the step's loss with respect to them is zero (stop_gradient)."""
    from lm.compress.teacher import Teacher
    from lm.train.param_source import RunCheckpoint
    from lm.train.setup import setup_run
    from lm.train.state import build
    student = resolve("configs/default.py", TINY + ["model.d_model=16", "model.n_heads=2",
                                                    "distill.teacher=x", "distill.weight=0.5"])
    setup = setup_run(student)
    plain = setup_run(dataclasses.replace(student, distill=DistillConfig()))
    t_cfg = dataclasses.replace(
        setup.cfg, model=dataclasses.replace(setup.cfg.model, d_model=32), distill=DistillConfig())
    t_pieces = build(t_cfg, setup.pieces.mesh)
    setup.pieces.teacher = Teacher(t_cfg, t_pieces, RunCheckpoint(tmp_path))
    t_params = t_pieces.init_state()["params"]
    before = jax.tree.map(np.asarray, t_params)
    state = setup.pieces.init_state()
    assert (jax.tree.structure(state["opt_state"])
            == jax.tree.structure(plain.pieces.init_state()["opt_state"]))
    # No optimizer-state leaf is shaped like a teacher-only weight (d_model 32).
    shapes = {x.shape for x in jax.tree.leaves(state["opt_state"])}
    assert (32, 32 * 4) not in shapes and (259, 32) not in shapes
    step = setup.pieces.train_step()
    batch = setup.pieces.global_batch({k: np.asarray(v) for k, v in _batch(setup.cfg).items()})
    new, metrics = step(state, batch, t_params)
    assert float(metrics["kd_loss"]) > 0 and np.isfinite(float(metrics["loss"]))
    assert jax.tree.structure(new["opt_state"]) == jax.tree.structure(
        plain.pieces.init_state()["opt_state"])
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(t_params)):
        np.testing.assert_array_equal(a, np.asarray(b))  # not donated, not updated
    s_graphdef, t_graphdef = setup.pieces.graphdef, t_pieces.graphdef
    params = plain.pieces.init_state()["params"]
    b = _batch(setup.cfg)

    def loss_of_teacher(tp):
        return loss_sums(s_graphdef, params, b, 0.0, jnp.sum(b["loss_mask"]), 0,
                         (t_graphdef, tp, setup.cfg.distill, Plan(), None))[0]
    g = jax.grad(loss_of_teacher)(t_params)
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(g))


def _fake_run(path, *overrides):
    """A run dir whose config.json says what a teacher is (its weights are not read
    before the checks)."""
    cfg = resolve("configs/default.py", TINY + list(overrides))
    path.mkdir(parents=True)
    (path / "config.json").write_text(config_lib.to_json(cfg))
    return path


def test_a_teacher_of_another_vocabulary_or_tokenizer_or_gone_is_refused(lm_here, tmp_path):
    other = _fake_run(tmp_path / "other_vocab", "model.vocab_size=300")
    assert_train_refused(lm_here, tmp_path / "a", [f"distill.teacher={other}"],
                         "the teacher's vocabulary (300 logits")
    tok = tmp_path / "tok.json"
    tok.write_text("{}")
    other_tok = _fake_run(tmp_path / "other_tok", "model.vocab_size=259")
    cfg = json.loads((other_tok / "config.json").read_text())
    cfg["data"]["tokenizer"] = str(tmp_path / "missing.model")
    (other_tok / "config.json").write_text(json.dumps(cfg))
    assert_train_refused(lm_here, tmp_path / "b", [f"distill.teacher={other_tok}"],
                         f"distill.teacher={other_tok}: its tokenizer")
    assert_train_refused(lm_here, tmp_path / "c", [f"distill.teacher={tmp_path / 'gone'}"],
                         f"distill.teacher={tmp_path / 'gone'}: no config.json there")
    result = lm_here("train", "--run-dir", str(tmp_path / "d"), "--distill-from",
                     str(tmp_path / "gone"), "--set", "steps=1")
    assert result.returncode == 2 and "distill.teacher=" in result.stderr
    same = _fake_run(tmp_path / "same", "model.vocab_size=259")
    assert_train_refused(lm_here, tmp_path / "e", [f"distill.teacher={same}", "model.vocab_size=259",
                                                   "distill.relation_weight=1",
                                                   "distill.relation_heads=5"],
                         "distill.relation_heads=5 must divide the Q/K/V widths")
    assert_train_refused(lm_here, tmp_path / "f", [f"distill.teacher={same}", "model.vocab_size=259",
                                                   "distill.hidden_weight=1",
                                                   "distill.hidden_layers=0:7"],
                         "distill.hidden_layers: 0:7 is out of range")
    with pytest.raises(ConfigError, match="distill.temperature must be positive"):
        resolve("configs/default.py", ["distill.temperature=0"])
    with pytest.raises(ConfigError, match=r"distill.weight must be in \[0, 1\]"):
        resolve("configs/default.py", ["distill.weight=1.5"])


def test_hidden_state_loss_is_the_projected_mse_and_zero_for_an_equal_teacher():
    from lm.compress.distill import layer_pairs
    cfg, graphdef, params = _model()
    batch = _batch(cfg)
    denom = jnp.sum(batch["loss_mask"])
    dcfg = DistillConfig(teacher="x", weight=1.0, hidden_weight=1.0, hidden_layers="0:0,1:1")
    pairs = layer_pairs(dcfg, 2, 2)
    grads, stats = jax.grad(loss_sums, argnums=1, has_aux=True)(
        graphdef, params, batch, 0.0, denom, 0, (graphdef, params, dcfg, Plan(pairs), None))
    assert abs(float(stats["hidden_loss"])) < 1e-10  # (weight 1: no data loss either)
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) < 1e-6
    # A wider teacher (48), a projection [32, 48]: the hand-computed masked MSE.
    _, t_graphdef, t_params = _model("model.d_model=48", "model.n_heads=3", "model.n_layers=4",
                                     seed=2)
    dcfg = DistillConfig(teacher="x", weight=1.0, hidden_weight=2.0, teacher_width=48)
    pairs = layer_pairs(dcfg, 2, 4)
    assert pairs == ((0, 1), (1, 3))
    proj = {"proj": jax.random.normal(jax.random.PRNGKey(0), (32, 48)) / 6}
    loss, stats = loss_sums(graphdef, params, batch, 0.0, denom, 8,
                            (t_graphdef, t_params, dcfg, Plan(pairs), proj))
    _, s_aux = nnx.merge(graphdef, params).hidden_states(batch["inputs"], taps=(0, 1))
    _, t_aux = nnx.merge(t_graphdef, t_params).hidden_states(batch["inputs"], taps=(1, 3))
    m = np.asarray(batch["loss_mask"])
    want = np.mean([np.sum(np.mean((np.asarray(s) @ np.asarray(proj["proj"]) - np.asarray(t)) ** 2,
                                   -1) * m) / m.sum()
                    for s, t in zip(s_aux["taps"], t_aux["taps"])])
    np.testing.assert_allclose(float(stats["hidden_loss"]), want, rtol=1e-4)
    np.testing.assert_allclose(float(loss), float(stats["kd_loss"]) + 2.0 * want, rtol=1e-4)
    # The projection gets a gradient; the teacher does not.
    g_proj = jax.grad(lambda pr: loss_sums(graphdef, params, batch, 0.0, denom, 0,
                                           (t_graphdef, t_params, dcfg, Plan(pairs), pr))[0])(proj)
    assert float(jnp.max(jnp.abs(g_proj["proj"]))) > 0
    g_t = jax.grad(lambda tp: loss_sums(graphdef, params, batch, 0.0, denom, 0,
                                        (t_graphdef, tp, dcfg, Plan(pairs), proj))[0])(t_params)
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(g_t))


def test_layer_pairs_default_to_a_uniform_map_and_refuse_out_of_range():
    from lm.compress.distill import layer_pairs
    on = DistillConfig(teacher="x", hidden_weight=1.0)
    assert layer_pairs(on, 2, 4) == ((0, 1), (1, 3))
    assert layer_pairs(on, 4, 2) == ((0, 0), (1, 0), (2, 0), (3, 1))
    assert layer_pairs(dataclasses.replace(on, hidden_layers="-1:-1, 0:2"), 3, 6) == ((2, 5), (0, 2))
    with pytest.raises(ConfigError, match="out of range"):
        layer_pairs(dataclasses.replace(on, hidden_layers="3:0"), 3, 6)
    with pytest.raises(ConfigError, match="is not student:teacher"):
        resolve("configs/default.py", ["distill.hidden_layers=1-2"])


def _relation(graphdef, params, t_graphdef, t_params, batch, plan, weight=1.0):
    dcfg = DistillConfig(teacher="x", weight=weight, relation_weight=1.0)
    return jax.grad(loss_sums, argnums=1, has_aux=True)(
        graphdef, params, batch, 0.0, jnp.sum(batch["loss_mask"]), 0,
        (t_graphdef, t_params, dcfg, plan, None))


def test_relation_loss_is_zero_for_an_equal_teacher_and_invariant_to_the_head_count():
    """MiniLM relations are of the heads' projections concatenated: a model whose Q/K/V
    are the same matrices split into 4 heads of 8 instead of 2 of 16 has the same
    relations at a layer whose input is the same (layer 0: the embedding)."""
    cfg, graphdef, params = _model()  # 2 heads x 16
    batch = dict(_batch(cfg), segment_ids=jnp.asarray(  # two documents per row
        np.repeat([[1] * 20 + [2] * 12], 4, 0), jnp.int32))
    grads, stats = _relation(graphdef, params, graphdef, params, batch,
                             Plan(relation=(1, 1, 4)))
    assert abs(float(stats["relation_loss"])) < 1e-6
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) < 1e-6

    _, g4, p4 = _model("model.n_heads=4")  # 4 heads x 8, the same matrices reshaped
    params, p4 = nnx.to_pure_dict(params), nnx.to_pure_dict(p4)
    p4["embed"] = params["embed"]
    for i in range(2):
        for w in ("wq", "wk", "wv", "wo"):
            p4["blocks"][i]["mixer"][w] = params["blocks"][i]["mixer"][w].reshape(
                p4["blocks"][i]["mixer"][w].shape)
    _, other_g, other = _model("model.d_model=48", "model.n_heads=3", seed=5)  # a teacher
    plan = Plan(relation=(0, 1, 4))  # R=4 divides 32 (both students) and 48 (the teacher)
    _, s2 = _relation(graphdef, params, other_g, other, batch, plan)
    _, s4 = _relation(g4, p4, other_g, other, batch, plan)
    assert float(s2["relation_loss"]) > 1e-4
    np.testing.assert_allclose(float(s4["relation_loss"]), float(s2["relation_loss"]),
                               rtol=1e-5)
    # Either split as the other's teacher at layer 0: zero.
    _, s24 = _relation(graphdef, params, g4, p4, batch, Plan(relation=(0, 0, 8)))
    assert abs(float(s24["relation_loss"])) < 1e-6


def test_relation_loss_is_the_hand_computed_causal_relation_kl():
    """relation_loss on a tiny case against numpy: per relation head, softmax over the
    visible keys (key <= query, same document) of A A^T / sqrt(d_r), KL(teacher ||
    student) per query, mean over heads, masked mean over queries, mean over Q/K/V."""
    from lm.compress.distill import relation_loss
    rng = np.random.default_rng(0)
    b, t = 2, 5
    s_qkv = [rng.normal(size=(b, t, 4)).astype(np.float32) for _ in range(3)]
    t_qkv = [rng.normal(size=(b, t, 6)).astype(np.float32) for _ in range(3)]
    seg = np.array([[1, 1, 1, 2, 2], [1, 1, 1, 1, 1]])
    mask = np.array([[1, 1, 0, 1, 1], [1, 1, 1, 1, 0]], np.float32)
    heads = 2

    def rel(a, row, i):  # [R, visible keys] log-probabilities of query i
        keys = [j for j in range(t) if j <= i and seg[row, j] == seg[row, i]]
        a = a[row].reshape(t, heads, -1).transpose(1, 0, 2)  # [R, T, d]
        scores = np.einsum("rd,rkd->rk", a[:, i], a[:, keys]) / np.sqrt(a.shape[-1])
        return scores - np.log(np.sum(np.exp(scores), -1, keepdims=True))

    want = 0.0
    for s, tt in zip(s_qkv, t_qkv):
        for row in range(b):
            for i in range(t):
                ls, lt = rel(s, row, i), rel(tt, row, i)
                kl = np.sum(np.exp(lt) * (lt - ls), -1).mean()
                want += kl * mask[row, i] / mask.sum()
    want /= 3
    got = relation_loss([jnp.asarray(x) for x in s_qkv], [jnp.asarray(x) for x in t_qkv],
                        heads, jnp.asarray(mask), jnp.asarray(seg), jnp.float32(mask.sum()))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_the_step_counts_the_teachers_forward_projection_and_relation_flops():
    """MFU counts what distillation adds: the teacher's forward (a third of its 6N
    FLOPs), the projection (6 d_s d_t per hidden pair when widths differ) and the
    relation products (2 W per visible key; student x3, teacher x1)."""
    from lm.compress.teacher import Teacher
    from lm.model import ModelConfig, flops_per_token
    base = resolve("configs/default.py", TINY + ["model.vocab_size=259"])
    teacher_model = dataclasses.replace(base.model, d_model=64, n_heads=4)  # dh 16
    teacher_cfg = dataclasses.replace(base, model=teacher_model)
    student = dataclasses.replace(base.model, d_model=32, n_heads=2, n_kv_heads=1)
    forward = flops_per_token(teacher_model, base.data.seq_len) / 3
    bare = Teacher(teacher_cfg, None, None, Plan())
    assert bare.step_flops_per_token(student) == forward
    hidden = Teacher(teacher_cfg, None, None, Plan(hidden=((0, 0), (1, 1))))
    assert hidden.step_flops_per_token(student) == forward + 2 * 6 * 32 * 64
    assert Teacher(teacher_cfg, None, None, Plan(hidden=((0, 0),))).step_flops_per_token(
        dataclasses.replace(student, d_model=64)) == forward  # equal widths: no projection
    relation = Teacher(teacher_cfg, None, None, Plan(relation=(1, 1, 2)))
    visible = (base.data.seq_len + 1) / 2
    s_qkv, t_qkv = 2 * 16 + 2 * 1 * 16, 3 * 64
    assert relation.step_flops_per_token(student) == pytest.approx(
        forward + 2 * visible * (3 * s_qkv + t_qkv))
    assert isinstance(student, ModelConfig)
