"""The Mosaic TPU scan kernel (kernels/scan/tpu.py), checked on CPU:
- numerics in Pallas's TPU interpret mode (TPU semantics: VMEM scratch, block DMAs,
  shuffled order of the parallel grid axes) against the token-by-token reference,
  outputs, final state and the gradients of every input;
- lowering for TPU (`lowering_platforms=("tpu",)`, Pallas's TPU checks, no libtpu) and a
  real Mosaic compile through libtpu for a v5p topology (tile legality is checked there),
  of the kernel alone and of a tiny Mamba-2 / hybrid model's whole train step, whose HLO
  must hold the kernel's custom calls at the per-shard batch (fsdp=4: shard_local), and
  on one chip, where nothing tells Pallas the TPU generation.
What this cannot check: the kernel's speed on a TPU (benchmarks/kernel_bench.py there)."""

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

from lm.kernels.dispatch import compiling_for
from lm.kernels.scan import linear_scan, scan_reference, tpu
from conftest import ROOT

KERNEL = "chunked_linear_scan_tpu"
V5P = AbstractMesh((1,), ("x",), axis_types=(AxisType.Auto,),
                   abstract_device=AbstractDevice(device_kind="TPU v5", num_cores=2,
                                                  platform="tpu"))


def _inputs(b, t, g, h, dk, dv, dtype, boundaries, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(ks[0], (b, t, g, dk)).astype(dtype)
    k = (jax.random.normal(ks[1], (b, t, g, dk)) / np.sqrt(dk)).astype(dtype)
    v = jax.random.normal(ks[2], (b, t, h, dv)).astype(dtype)
    a = -jax.nn.softplus(jax.random.normal(ks[3], (b, t, h)) - 1.0)
    s0 = jax.random.normal(ks[4], (b, h, dk, dv))
    row = np.searchsorted(np.asarray(boundaries), np.arange(t), side="right")
    seg = jnp.asarray(np.stack([row, np.zeros(t, int)][:b]), jnp.int32)  # row 2: one doc
    return q, k, v, a, s0, seg


# TPU interpret mode as a megacore chip: two cores splitting the parallel (batch, head)
# axes, in a shuffled order, each with its own VMEM scratch (uninitialised = NaN, so a
# state read before it is set shows), with the race detector on.
INTERPRET = pltpu.InterpretParams(num_cores_or_threads=2, random_seed=3, detect_races=True)


def _tpu_scan(seg, chunk):
    def fn(q, k, v, a, s0):
        with compiling_for("tpu"):  # the TPU kernel, in TPU interpret mode
            return linear_scan(q, k, v, a, segment_ids=seg, initial_state=s0,
                               chunk_size=chunk, impl="pallas", interpret=INTERPRET)
    return fn


@pytest.mark.parametrize("dtype,g,h,t,dk,dv,chunk,boundaries", [
    # documents start off chunk edges; T = 40 not a multiple of the chunk; 3 chunks in
    # one grid step; q/k of one group reach the kernel as [B, T, Dk] (free reshape), v
    # transposed (Dv < 128)
    (jnp.float32, 1, 2, 40, 8, 16, 16, (13, 33)),
    # bf16, 2 heads per group, documents starting exactly at chunk edges; chunk 8 is
    # rounded up to 16 (one bf16 tile of rows)
    (jnp.bfloat16, 2, 4, 48, 16, 16, 8, (16, 32)),
    # 10 chunks: 2 grid steps of 8 (the state crosses grid steps in VMEM scratch), the
    # sequence padded by 6 chunks (BLOCK_TOKENS = 128 here); Dv = 128 (v and o as [B, T, H*Dv], no transpose);
    # a reset on the last token
    (jnp.float32, 2, 2, 150, 8, 128, 16, (5, 80, 149)),
    # T shorter than the chunk
    (jnp.float32, 1, 1, 10, 8, 8, 64, (4,)),
])
def test_tpu_kernel_matches_reference(monkeypatch, dtype, g, h, t, dk, dv, chunk, boundaries):
    monkeypatch.setattr(tpu, "BLOCK_TOKENS", 128)  # 8 chunks of 16 a step: short tests
    q, k, v, a, s0, seg = _inputs(2, t, g, h, dk, dv, dtype, boundaries)
    ours = _tpu_scan(seg, chunk)
    assert KERNEL in str(jax.make_jaxpr(ours)(q, k, v, a, s0))  # not the XLA fallback

    def ref(q, k, v, a, s0):
        return scan_reference(q, k, v, a, segment_ids=seg, initial_state=s0)

    ks = jax.random.split(jax.random.PRNGKey(9), 2)
    ct_o, ct_s = jax.random.normal(ks[0], v.shape), jax.random.normal(ks[1], s0.shape)

    def grads(fn):
        def loss(*x):
            o, s = fn(*x)
            return jnp.sum(o.astype(jnp.float32) * ct_o) + jnp.sum(s * ct_s)
        return fn(q, k, v, a, s0), jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, a, s0)

    (o, s), d = grads(ours)
    (o_ref, s_ref), d_ref = grads(ref)
    tol = 1e-4 if dtype == jnp.float32 else 5e-2
    assert o.dtype == dtype and s.dtype == jnp.float32
    np.testing.assert_allclose(o.astype(np.float32), o_ref.astype(np.float32), rtol=tol,
                               atol=tol)
    np.testing.assert_allclose(s, s_ref, rtol=tol, atol=tol)
    for name, x, y in zip(("dq", "dk", "dv", "dlog_decay", "dinitial_state"), d, d_ref):
        scale = float(jnp.max(jnp.abs(y.astype(jnp.float32)))) + 1.0
        np.testing.assert_allclose(x.astype(np.float32) / scale, y.astype(np.float32) / scale,
                                   rtol=tol, atol=tol, err_msg=name)


def test_block_chunks():
    assert tpu.BLOCK_TOKENS == 512
    assert tpu.block_chunks(32, 64) == 8  # 2048 tokens: 4 grid steps of 512
    assert tpu.block_chunks(7, 64) == 7  # all chunks when they fit
    assert tpu.block_chunks(48, 16) == 24 and tpu.block_chunks(40, 16) == 8  # divisors
    assert tpu.block_chunks(10, 16) == 10 and tpu.block_chunks(13, 64) == 8  # pad 3 chunks
    assert tpu.block_chunks(16, 256) == 8  # at least 8 chunks a step (2048 tokens)


def test_tpu_kernel_lowers_for_tpu_forward_and_backward():
    """Pallas's TPU lowering (block shapes against TPU tiling) with no TPU and no libtpu."""
    f32 = jnp.float32

    def loss(q, k, v, a, seg):
        with compiling_for("tpu"):
            o, s = linear_scan(q, k, v, a, segment_ids=seg, chunk_size=64, impl="pallas")
        return o.astype(f32).sum() + s.sum()

    shapes = (jax.ShapeDtypeStruct((2, 200, 2, 64), jnp.bfloat16),) * 2 + (
        jax.ShapeDtypeStruct((2, 200, 4, 64), jnp.bfloat16),
        jax.ShapeDtypeStruct((2, 200, 4), f32), jax.ShapeDtypeStruct((2, 200), jnp.int32))
    # No abstract TPU mesh around it: on a CPU host the kernel's lowering must not need
    # the TPU generation (a 1-chip `lm compile` traces with no mesh context), G < H too.
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    hlo = grad.trace(*shapes).lower(lowering_platforms=("tpu",)).as_text()
    assert hlo.count("tpu_custom_call") == 4  # forward + the three backward runs
    with use_abstract_mesh(V5P):  # and for a named generation
        hlo = grad.trace(*shapes).lower(lowering_platforms=("tpu",)).as_text()
    assert hlo.count("tpu_custom_call") == 4


# Compiled through libtpu for TPU topology devices, in a subprocess: libtpu's plugin is
# initialised there only (ALLOW_MULTIPLE_LIBTPU_LOAD: other test processes on this host
# may hold libtpu's lockfile; no TPU is opened either way).
_COMPILE = textwrap.dedent("""
    import json, re, sys
    import jax, jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from lm.kernels.dispatch import compiling_for
    from lm.kernels.scan import linear_scan
    from lm.config import DataConfig, MeshConfig, ModelConfig, TrainConfig, apply_overrides
    from lm.parallel.mesh import make_mesh
    from lm.train.state import build

    devices = topologies.get_topology_desc(
        platform="tpu", topology_name="v5p:2x2x1", chip_config_name="default",
        chips_per_host_bounds=(2, 2, 1), num_slices=1).devices
    out = {}

    def calls(hlo):  # the first output's shape of each scan kernel call (jvp_... names)
        return re.findall(r"%\\S*chunked_linear_scan_tpu\\S* = \\((\\w+\\[[0-9,]*\\])", hlo)

    # The kernel alone, forward and backward, bf16, Dk = Dv = 64 (transposed layout).
    one = Mesh(devices[:1], ("x",))
    spec = lambda *s, d=jnp.bfloat16: jax.ShapeDtypeStruct(s, d, sharding=NamedSharding(one, P()))
    def loss(q, k, v, a, seg):
        with compiling_for("tpu"):
            o, s = linear_scan(q, k, v, a, segment_ids=seg, chunk_size=64, impl="pallas")
        return o.astype(jnp.float32).sum() + s.sum()
    traced = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(
        spec(1, 200, 1, 64), spec(1, 200, 1, 64), spec(1, 200, 4, 64),
        spec(1, 200, 4, d=jnp.float32), spec(1, 200, d=jnp.int32))
    out["kernel"] = calls(traced.lower().compile().as_text())

    for run in sys.argv[1:]:  # PATTERN:CHIPS
        pattern, chips = run.split(":")
        cfg = TrainConfig(
            model=ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=2,
                              max_seq_len=32, mixer_pattern=pattern),
            data=DataConfig(seq_len=32), mesh=MeshConfig(data=1, fsdp=int(chips)),
            batch_size=8, steps=2)
        # XLA attention in "am": this test is about the scan kernel (splash has its own).
        cfg = apply_overrides(cfg, ["model.mamba2.scan_impl=pallas", "model.mamba2.state=16",
                                    "model.attention.impl=xla",
                                    "model.retention.scan_impl=pallas"])
        pieces = build(cfg, mesh=make_mesh(cfg.mesh, devices[:int(chips)]))
        compiled = pieces.train_step().trace(pieces.abstract_state(),
                                             pieces.abstract_batch()).lower().compile()
        out[run] = calls(compiled.as_text())
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.slow
def test_train_step_compiles_for_tpu_with_the_scan_kernel_per_shard():
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    proc = subprocess.run([sys.executable, "-c", _COMPILE, "m:4", "am:4", "r:4", "m:1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    got = json.loads(lines[-1][len("RESULT "):])
    # The kernel alone: forward + three backward runs, o as [B, H, T, Dv] (Dv < 128).
    # T = 200 padded to 256 (chunk 64).
    assert sorted(got["kernel"]) == ["bf16[1,4,256,64]"] + ["f32[1,4,256,64]"] * 3, got
    # Whole train steps: per scan layer one forward and three backward kernel calls, on
    # the per-shard batch: 8 rows / fsdp 4 = 2 (GSPMD would have run them on all 8); on
    # one chip (no shard_map, no mesh context) all 8.
    for run, n_layers, rows in [("m:4", 2, 2), ("am:4", 1, 2), ("r:4", 2, 2), ("m:1", 2, 8)]:
        assert len(got[run]) == 4 * n_layers, (run, got[run])
        assert all(shape.split("[")[1].startswith(f"{rows},") for shape in got[run]), got


# The mixers' per-shard scan (lm.model.mixers.sharded_linear_scan) on simulated CPU
# devices: the Pallas path (here the generic kernel in interpret mode; the wrapping is
# the same on TPU) under shard_map equals the unsharded XLA scan, for one q/k group, a
# group per head, groups that shard with the heads, and groups that cannot (tensor=4
# splits 4 heads but not 2 groups: both kept whole).
_SHARDED = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from lm.kernels.scan import linear_scan
    from lm.config import MeshConfig
    from lm.model.mixers import sharded_linear_scan
    from lm.parallel.mesh import make_mesh
    from lm.parallel.sharding import activation_sharding, parse_rules

    out = []
    for fsdp, tensor, g in [(2, 2, 1), (2, 2, 4), (2, 2, 2), (1, 4, 2)]:
        b, t, h, dk, dv = 4, 24, 4, 8, 8
        ks = jax.random.split(jax.random.PRNGKey(g), 5)
        q = jax.random.normal(ks[0], (b, t, g, dk))
        k = jax.random.normal(ks[1], (b, t, g, dk)) / 3
        v = jax.random.normal(ks[2], (b, t, h, dv))
        a = -jax.nn.softplus(jax.random.normal(ks[3], (b, t, h)))
        s0 = jax.random.normal(ks[4], (b, h, dk, dv))
        seg = jnp.asarray(np.repeat([[0] * 10 + [1] * 14], b, 0), jnp.int32)
        mesh = make_mesh(MeshConfig(data=1, fsdp=fsdp, tensor=tensor), jax.devices()[:4])

        def fn(q, k, v, a, s0, seg):
            with activation_sharding(mesh, parse_rules("")):
                return sharded_linear_scan(q, k, v, a, segment_ids=seg, initial_state=s0,
                                           chunk_size=8, impl="pallas")
        got = jax.jit(fn)(q, k, v, a, s0, seg)
        want = linear_scan(q, k, v, a, segment_ids=seg, initial_state=s0, chunk_size=8,
                           impl="xla")
        out.append({"case": [fsdp, tensor, g],
                    "shard_map": "shard_map" in str(jax.make_jaxpr(fn)(q, k, v, a, s0, seg)),
                    "err": max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(got, want))})
    print("RESULT " + json.dumps(out))
""")


def test_mixer_scan_runs_per_shard_and_matches():
    from conftest import simulated_devices_result
    for case in simulated_devices_result(_SHARDED, devices=4):
        assert case["shard_map"] and case["err"] < 1e-4, case
