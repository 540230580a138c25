"""Splash attention as lmlab's TPU attention (kernels/attention/splash.py), checked on CPU:
- numerics in Pallas's TPU interpret mode (TPU semantics: VMEM, DMAs, grid order)
  against `attention_reference`: out, lse, row_max and the gradients of q, k, v, over
  f32 / bf16, GQA groups 1 / 2 / 4 (MQA), documents ending off block edges, a window
  smaller than a block, window + sinks, T not a multiple of the block;
- the dispatch: attention(impl="pallas") on a TPU target lowers to splash's Mosaic
  custom calls (Pallas's TPU lowering, no libtpu);
- a tiny model's whole train step with model.attention.impl=pallas compiled through
  libtpu for v5e:2x2: splash's kernels at the per-shard batch (fsdp=4), under tensor
  parallelism with one kv head (repeated per tensor shard: the MQA kernel on one head
  per shard), with window + sinks; the xla path when the sequence is sharded.
What this cannot check: splash's speed on a TPU, and the block table's choice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

from lm.kernels.attention import attention, attention_reference
from lm.kernels.attention.splash import block_for, splash_attention
from lm.kernels.dispatch import compiling_for
from conftest import ROOT

D = 128  # the head dim splash is tuned for on TPU (a lane-width multiple)


def _inputs(b, t, h, kv, dtype, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(ks[0], (b, t, h, D)).astype(dtype)
    k = jax.random.normal(ks[1], (b, t, kv, D)).astype(dtype)
    v = jax.random.normal(ks[2], (b, t, kv, D)).astype(dtype)
    return q, k, v


def _segments(b, t):
    """Documents ending at 70 and 150 in row 0 and at 37 in row 1 (none on a 128 edge),
    with ids that repeat non-adjacently (lmlab documents are runs of equal ids)."""
    seg = np.ones((b, t), np.int32)
    seg[0, 70:150], seg[0, 150:] = 2, 1
    if b > 1:
        seg[1, 37:] = 5
    return jnp.asarray(seg)


CASES = [
    # dtype, T, H, KV, window, sinks, segments, softcap
    pytest.param(jnp.float32, 200, 2, 2, 0, 0, True, 0.0, id="f32-mha-docs-T200"),
    pytest.param(jnp.float32, 256, 4, 2, 40, 0, True, 0.0, id="f32-gqa2-window40"),
    pytest.param(jnp.bfloat16, 200, 4, 1, 40, 4, True, 0.0, id="bf16-mqa-window-sinks-T200"),
    pytest.param(jnp.bfloat16, 256, 4, 4, 0, 0, False, 0.0, id="bf16-mha-no-segments"),
    pytest.param(jnp.float32, 200, 4, 2, 40, 4, True, 2.0, id="f32-gqa2-window-sinks-softcap"),
    pytest.param(jnp.float32, 256, 4, 1, 24, 3, True, 0.0, id="f32-mqa-window-sinks",
                 marks=pytest.mark.slow),
    pytest.param(jnp.bfloat16, 300, 4, 2, 0, 0, True, 0.0, id="bf16-gqa2-T300",
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("dtype,t,h,kv,window,sinks,segmented,softcap", CASES)
def test_splash_matches_reference_in_tpu_interpret_mode(dtype, t, h, kv, window, sinks,
                                                        segmented, softcap):
    b = 2
    q, k, v = _inputs(b, t, h, kv, dtype)
    seg = _segments(b, t) if segmented else None
    kw = dict(segment_ids=seg, window=window, sinks=sinks, softcap=softcap)
    interp = pltpu.InterpretParams()
    w = jax.random.normal(jax.random.PRNGKey(9), (b, t, h, D))  # a generic cotangent

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v)[0].astype(jnp.float32) * w)

    def ours(q, k, v):
        return splash_attention(q, k, v, block=128, interpret=interp, **kw)

    def ref(q, k, v):
        return attention_reference(q, k, v, **kw)

    out, lse, row_max = jax.jit(ours)(q, k, v)
    r_out, r_lse, r_max = ref(q, k, v)
    grads = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(q, k, v)
    r_grads = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)

    tol = 2e-5 if dtype == jnp.float32 else 3e-2
    assert out.dtype == dtype and out.shape == q.shape
    np.testing.assert_allclose(out.astype(np.float32), r_out.astype(np.float32), atol=tol,
                               rtol=tol)
    np.testing.assert_allclose(lse, r_lse, atol=tol * 10, rtol=tol)
    # The row-max pass is exact (XLA, the same products): tight even in bf16.
    np.testing.assert_allclose(row_max, r_max, atol=1e-4 if dtype == jnp.float32 else 2e-2,
                               rtol=1e-5)
    for name, g, r in zip(("dq", "dk", "dv"), grads, r_grads):
        assert g.dtype == dtype and g.shape == r.shape
        scale = float(jnp.max(jnp.abs(r.astype(jnp.float32))))
        np.testing.assert_allclose(g.astype(np.float32) / scale, r.astype(np.float32) / scale,
                                   atol=tol * 3, rtol=0, err_msg=name)
    if sinks:  # the case really exercises sinks: they change the answer
        no_sinks = attention_reference(q, k, v, **{**kw, "sinks": 0})[0]
        assert float(jnp.max(jnp.abs(no_sinks.astype(jnp.float32)
                                     - r_out.astype(jnp.float32)))) > 10 * tol
    if softcap:  # and the cap bites
        assert float(jnp.max(row_max)) < softcap
        uncapped = attention_reference(q, k, v, **{**kw, "softcap": 0.0})[0]
        assert float(jnp.max(jnp.abs(uncapped - r_out))) > 10 * tol


def test_block_table():
    assert block_for("TPU v5 lite", 4096) == 512
    assert block_for("TPU v6 lite", 8192) == 512
    assert block_for(None, 200) == 256  # short sequences: a multiple of 128, not 512
    assert block_for("TPU v4", 64) == 128


V5E = AbstractMesh((1,), ("x",), axis_types=(AxisType.Auto,),
                   abstract_device=AbstractDevice(device_kind="TPU v5 lite", num_cores=1,
                                                  platform="tpu"))


def test_attention_on_a_tpu_target_lowers_to_splash():
    """lm.kernels.attention.attention(impl=pallas) picks splash for a TPU target: its forward
    and both backward kernels are Mosaic custom calls (Pallas's TPU lowering checks)."""
    def loss(q, k, v, seg):
        with compiling_for("tpu"):
            out, _, row_max = attention(q, k, v, impl="pallas", segment_ids=seg,
                                        window=64, sinks=2)
        return out.astype(jnp.float32).sum() + row_max.sum()

    shapes = (jax.ShapeDtypeStruct((2, 200, 4, D), jnp.bfloat16),
              *[jax.ShapeDtypeStruct((2, 200, 2, D), jnp.bfloat16)] * 2,
              jax.ShapeDtypeStruct((2, 200), jnp.int32))
    with use_abstract_mesh(V5E):
        hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*shapes).lower(
            lowering_platforms=("tpu",)).as_text()
    assert hlo.count("tpu_custom_call") == 3, hlo.count("tpu_custom_call")
    for phase in ("fwd", "dq", "dkv"):
        assert f"splash_mha_{phase}_segmented" in hlo


# Compiled through libtpu for TPU topology devices in a subprocess: libtpu's plugin is
# initialised there only (ALLOW_MULTIPLE_LIBTPU_LOAD: other test processes on this host
# may hold libtpu's lockfile; no TPU is opened either way).
_COMPILE = textwrap.dedent("""
    import json, re
    from jax.experimental import topologies
    from lm.config import DataConfig, MeshConfig, ModelConfig, TrainConfig, apply_overrides
    from lm.parallel.mesh import make_mesh
    from lm.train.state import build

    devices = topologies.get_topology_desc(
        platform="tpu", topology_name="v5e:2x2", chip_config_name="default",
        chips_per_host_bounds=(2, 2, 1), num_slices=1).devices
    runs = {"fsdp": (MeshConfig(data=1, fsdp=4), []),
            "tensor_mqa": (MeshConfig(data=1, fsdp=2, tensor=2), ["model.n_kv_heads=1"]),
            "sinks": (MeshConfig(data=1, fsdp=4),
                      ["model.attention.window=16", "model.attention.sinks=2"]),
            "sequence": (MeshConfig(data=1, fsdp=2, sequence=2), [])}
    out = {}
    for name, (mesh, sets) in runs.items():
        cfg = TrainConfig(
            model=ModelConfig(vocab_size=256, d_model=128, n_layers=2, n_heads=2,
                              max_seq_len=64),
            data=DataConfig(seq_len=64), mesh=mesh, batch_size=8, steps=2)
        cfg = apply_overrides(cfg, ["model.attention.impl=pallas", *sets])
        pieces = build(cfg, mesh=make_mesh(cfg.mesh, devices))
        hlo = pieces.train_step().trace(pieces.abstract_state(),
                                        pieces.abstract_batch()).lower().compile().as_text()
        # kernel name -> the shape of its first output, once per distinct call site.
        out[name] = sorted(set(re.findall(r"%(splash_[a-z_]+)[.0-9]* = \\(?(\\w+\\[[0-9,]*\\])",
                                          hlo)))
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.slow
def test_train_step_compiles_for_tpu_with_splash_per_shard():
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    proc = subprocess.run([sys.executable, "-c", _COMPILE], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    got = {k: dict(v) for k, v in json.loads(lines[-1][len("RESULT "):]).items()}
    # fsdp=4: 8 rows / 4 = 2 per shard (GSPMD would have run the kernel on all 8), both
    # heads, seq 64 padded to one 128 block, head dim 64.
    mha = {f"splash_mha_{p}_segmented_{r}" for p, r in
           (("fwd", "residuals"), ("dq", "no_residuals"), ("dkv", "no_residuals"))}
    for name in ("fsdp", "sinks"):
        assert set(got[name]) == mha, got[name]
        assert got[name]["splash_mha_fwd_segmented_residuals"] == "f32[2,2,128,64]"
    # tensor=2 with one kv head: the kv head is repeated to 2 (one per tensor shard), so
    # each shard runs the MQA kernel on its 1 query head and 8 / fsdp 2 = 4 rows.
    assert got["tensor_mqa"]["splash_mqa_fwd_segmented_residuals"] == "f32[4,1,128,64]"
    assert got["sequence"] == {}  # sequence sharded: the xla path (logged)


# The attention mixer's per-shard kernel call on simulated CPU devices: impl=pallas (on
# CPU the generic flash kernel in interpret mode; the shard_local wrapping, kv-head
# repetition and layout are the same as for splash on TPU) equals the unsharded xla path,
# logits, max-logit diagnostic and parameter gradients, under fsdp, under tensor
# parallelism with kv heads that do divide (2 of 4 over 2) and that do not (1 over 2,
# 2 over 4: repeated per shard).
_SHARDED = textwrap.dedent("""
    import dataclasses, json
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from lm.config import MeshConfig, ModelConfig
    from lm.model import Transformer
    from lm.model.mixers.attention import AttentionConfig
    from lm.parallel.mesh import make_mesh
    from lm.parallel.sharding import activation_sharding, parse_rules

    out = []
    for fsdp, tensor, kv in [(4, 1, 2), (2, 2, 2), (2, 2, 1), (1, 4, 2)]:
        cfg = ModelConfig(vocab_size=61, d_model=64, n_layers=1, n_heads=4, n_kv_heads=kv,
                          max_seq_len=32, init_std=0.2,
                          attention=AttentionConfig(impl="xla", window=6, sinks=2))
        x = jax.random.randint(jax.random.PRNGKey(1), (4, 24), 0, 61)
        seg = jnp.asarray(np.repeat([[1] * 10 + [2] * 14], 4, 0), jnp.int32)
        pos = jnp.asarray(np.repeat([list(range(10)) + list(range(14))], 4, 0), jnp.int32)
        mesh = make_mesh(MeshConfig(data=1, fsdp=fsdp, tensor=tensor), jax.devices()[:4])

        def run(impl, sharded):
            c = dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, impl=impl))
            graphdef, params = nnx.split(Transformer(c, nnx.Rngs(0)))
            def loss(p):
                logits, aux = nnx.merge(graphdef, p)(x, positions_BT=pos, segment_ids_BT=seg)
                return jnp.sum(logits ** 2) / logits.size, (logits, aux["attn_logit_max"])
            def fn(p):
                if not sharded:
                    return jax.grad(loss, has_aux=True)(p)
                with activation_sharding(mesh, parse_rules("")):
                    return jax.grad(loss, has_aux=True)(p)
            jaxpr = str(jax.make_jaxpr(fn)(params)) if sharded else ""
            return jax.jit(fn)(params), "shard_map" in jaxpr
        (g, (logits, mx)), shard_map = run("pallas", True)
        (g0, (logits0, mx0)), _ = run("xla", False)
        err = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-6))
                  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0)))
        out.append({"case": [fsdp, tensor, kv], "shard_map": shard_map,
                    "logits": float(jnp.max(jnp.abs(logits - logits0))),
                    "max_logit": float(jnp.max(jnp.abs(mx - mx0))), "grads": err})
    print("RESULT " + json.dumps(out))
""")


def test_mixer_runs_the_kernel_per_shard_and_matches_xla():
    from conftest import simulated_devices_result
    for case in simulated_devices_result(_SHARDED, devices=4):
        assert case["shard_map"], case
        assert case["logits"] < 1e-4 and case["max_logit"] < 1e-5 and case["grads"] < 1e-4, case
